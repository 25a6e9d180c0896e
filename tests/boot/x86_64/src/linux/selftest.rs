//! Checks of the Linux VMM's pure parts against their specifications, run in the image
//! before the guest boots (the image has no host test harness): the `mov` decoder (Intel
//! SDM Vol. 2, chapter 2) on encodings gcc emits, the `stos` decoder of the shadow run, the 8259A's priorities, EOIs and cascade,
//! the 8254's counting, periodic expiry and channel-2 output, the 16450's registers and
//! transmitter interrupt, the e820 map and the module header. A guest that boots exercises these too, but only in the ways one kernel uses
//! them; these pin down the rules.

use alloc::format;
use alloc::string::String;

use super::blob;
use super::bootproto::{e820_from_slots, E820, E820_RAM, E820_RESERVED};
use super::mmio::{decode, load_result, Access, Decoded};
use super::pic::Pic;
use super::pit::{Pit, PIT_HZ};
use super::serial::Serial;
use super::shadow_mmu::{decode_stos, Stos};

fn code(bytes: &[u8]) -> [u8; 15] {
    let mut c = [0x90u8; 15];
    c[..bytes.len()].copy_from_slice(bytes);
    c
}

fn load(reg: u8, bytes: u8, op_bytes: u8, high_byte: bool) -> Access {
    Access::Load { reg, bytes, op_bytes, high_byte }
}

fn check_decoder() -> Result<usize, String> {
    let cases: [(&[u8], Option<Decoded>); 12] = [
        // mov (%rax),%eax
        (&[0x8b, 0x00], Some(Decoded { len: 2, access: load(0, 4, 4, false) })),
        // movl $0x12345678,0x4(%rax)
        (
            &[0xc7, 0x40, 0x04, 0x78, 0x56, 0x34, 0x12],
            Some(Decoded { len: 7, access: Access::Store { bytes: 4 } }),
        ),
        // movzbl 0x9(%rax),%eax
        (&[0x0f, 0xb6, 0x40, 0x09], Some(Decoded { len: 4, access: load(0, 1, 4, false) })),
        // mov 0x18(%rax),%rdx
        (&[0x48, 0x8b, 0x50, 0x18], Some(Decoded { len: 4, access: load(2, 8, 8, false) })),
        // mov %dl,0x9(%rax)
        (&[0x88, 0x50, 0x09], Some(Decoded { len: 3, access: Access::Store { bytes: 1 } })),
        // mov %cx,(%rax)
        (&[0x66, 0x89, 0x08], Some(Decoded { len: 3, access: Access::Store { bytes: 2 } })),
        // mov 0xc0000000,%r8d (SIB, no base, disp32)
        (&[0x44, 0x8b, 0x04, 0x25, 0, 0, 0, 0xc0], Some(Decoded { len: 8, access: load(8, 4, 4, false) })),
        // mov 0x10(%rip),%eax
        (&[0x8b, 0x05, 0x10, 0, 0, 0], Some(Decoded { len: 6, access: load(0, 4, 4, false) })),
        // mov 0x1(%rax),%ah
        (&[0x8a, 0x60, 0x01], Some(Decoded { len: 3, access: load(4, 1, 1, true) })),
        // movw $0x1234,0x100(%rbx,%rcx,2) (SIB, disp32, imm16)
        (
            &[0x66, 0xc7, 0x84, 0x4b, 0, 1, 0, 0, 0x34, 0x12],
            Some(Decoded { len: 10, access: Access::Store { bytes: 2 } }),
        ),
        // rep movsb: not a mov to or from one location
        (&[0xf3, 0xa4], None),
        // add %eax,(%rax)
        (&[0x01, 0x00], None),
    ];
    for (i, (bytes, want)) in cases.iter().enumerate() {
        let got = decode(&code(bytes)).ok();
        if got != *want {
            return Err(format!("decoder case {i} {bytes:02x?}: got {got:?}, want {want:?}"));
        }
    }
    let loads = [
        (load(4, 1, 1, true), 0x1111_2222_3333_4444u64, 0x1111_2222_3333_ff44u64),
        (load(0, 1, 1, false), 0x1111_2222_3333_4444, 0x1111_2222_3333_44ff),
        (load(0, 2, 2, false), 0x1111_2222_3333_4444, 0x1111_2222_3333_ffff),
        (load(0, 4, 4, false), 0x1111_2222_3333_4444, 0xffff_ffff),
        (load(0, 1, 4, false), 0x1111_2222_3333_4444, 0xff),
        (load(0, 8, 8, false), 0, u64::MAX),
    ];
    for (i, (a, old, want)) in loads.iter().enumerate() {
        let got = load_result(*old, *a);
        if got != *want {
            return Err(format!("absent load {i}: {old:#x} became {got:#x}, want {want:#x}"));
        }
    }
    Ok(cases.len() + loads.len())
}

/// The `stos` decoder of the shadow run (Intel SDM Vol. 2B, STOS): element size from the
/// opcode, 66 and REX.W, the REP prefix, the length; nothing else, and nothing outside
/// 64-bit code.
fn check_stos() -> Result<usize, String> {
    let s = |size, rep, len| Some(Stos { size, rep, len });
    let cases: [(&[u8], bool, Option<Stos>); 8] = [
        // rep stos %eax,%es:(%rdi): Linux's reset_early_page_tables
        (&[0xf3, 0xab, 0x31, 0xc0], true, s(4, true, 2)),
        // rep stos %rax,%es:(%rdi): clear_page_rep
        (&[0xf3, 0x48, 0xab], true, s(8, true, 3)),
        // rep stos %al,%es:(%rdi): clear_page_erms
        (&[0xf3, 0xaa], true, s(1, true, 2)),
        // stos %ax,%es:(%rdi)
        (&[0x66, 0xab], true, s(2, false, 2)),
        // REX without W: 4 bytes
        (&[0x40, 0xab], true, s(4, false, 2)),
        // rep movsq: not a stos
        (&[0xf3, 0x48, 0xa5], true, None),
        // mov %eax,(%rdi)
        (&[0x89, 0x07], true, None),
        // 32-bit code: not decoded here
        (&[0xf3, 0xab], false, None),
    ];
    for (i, (bytes, long, want)) in cases.iter().enumerate() {
        let got = decode_stos(bytes, *long);
        if got != *want {
            return Err(format!("stos case {i} {bytes:02x?}: got {got:?}, want {want:?}"));
        }
    }
    Ok(cases.len())
}

/// Linux's `init_8259A`: vectors 0x30 and 0x38, cascade on IRQ2, normal EOI.
fn linux_pic() -> Pic {
    let mut p = Pic::new();
    for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01)] {
        p.io(port, Some(v));
    }
    for (port, v) in [(0xa0, 0x11), (0xa1, 0x38), (0xa1, 0x02), (0xa1, 0x01)] {
        p.io(port, Some(v));
    }
    // ICW1 clears the masks; Linux then restores its own (all masked at first).
    p.io(0x21, Some(0xff));
    p.io(0xa1, Some(0xff));
    p
}

fn check_pic() -> Result<usize, String> {
    let mut p = linux_pic();
    let mut n = 0;
    let mut expect = |what: &str, got: Option<u8>, want: Option<u8>| {
        n += 1;
        if got == want {
            Ok(())
        } else {
            Err(format!("PIC: {what}: got {got:x?}, want {want:x?}"))
        }
    };
    p.pulse(0);
    expect("masked after init", p.acknowledge(), None)?;
    p.io(0x21, Some(!0x15)); // unmask IRQ0, IRQ2 (cascade), IRQ4
    p.io(0xa1, Some(!0x01)); // unmask IRQ8
    expect("a request while masked stays pending", p.acknowledge(), Some(0x30))?;
    p.pulse(4);
    expect("IRQ4 waits for IRQ0's EOI", p.acknowledge(), None)?;
    p.io(0x20, Some(0x0b)); // OCW3: read ISR
    expect("ISR holds IRQ0", p.io(0x20, None), Some(0x01))?;
    p.io(0x20, Some(0x60)); // specific EOI of IRQ0
    expect("IRQ4 after the EOI", p.acknowledge(), Some(0x34))?;
    p.pulse(0);
    expect("IRQ0 preempts IRQ4", p.acknowledge(), Some(0x30))?;
    p.io(0x20, Some(0x20)); // non-specific EOI: IRQ0, the highest in service
    expect("ISR holds IRQ4 only", p.io(0x20, None), Some(0x10))?;
    p.io(0x20, Some(0x20));
    p.set_irq(8, true);
    expect("IRQ8 through the cascade", p.acknowledge(), Some(0x38))?;
    p.set_irq(8, false);
    p.set_irq(8, true);
    expect("a level held high raises nothing new", p.acknowledge(), None)?;
    p.io(0x21, Some(0xff));
    expect("mask reads back", p.io(0x21, None), Some(0xff))?;
    Ok(n)
}

fn check_pit() -> Result<usize, String> {
    // One TSC tick per PIT tick makes the arithmetic exact.
    let mut t = Pit::new(PIT_HZ);
    let mut n = 0;
    let mut expect = |what: &str, ok: bool| {
        n += 1;
        if ok {
            Ok(())
        } else {
            Err(format!("PIT: {what}"))
        }
    };
    t.io(0x43, Some(0x34), 1000); // channel 0, lobyte/hibyte, mode 2
    t.io(0x40, Some(100), 1000);
    t.io(0x40, Some(0), 1000);
    expect("periodic deadline one period after the load", t.next_deadline() == Some(1100))?;
    expect("no expiry before it", !t.poll(1099))?;
    expect("expiry at it", t.poll(1100))?;
    expect("the next period follows", t.next_deadline() == Some(1200))?;
    expect("missed periods are skipped, not queued", t.poll(1550) && t.next_deadline() == Some(1600))?;
    t.io(0x43, Some(0x00), 1630); // latch channel 0
    let lo = t.io(0x40, None, 1700).unwrap_or(0);
    let hi = t.io(0x40, None, 1700).unwrap_or(0);
    expect("latched count 70 (period 100, 30 ticks in)", (lo, hi) == (70, 0))?;
    t.io(0x43, Some(0x38), 2000); // mode 4 one-shot
    t.io(0x40, Some(50), 2000);
    t.io(0x40, Some(0), 2000);
    expect("one-shot fires once", t.poll(2050) && t.next_deadline().is_none())?;
    t.io(0x61, Some(0x01), 3000); // channel 2 gate on, speaker off
    t.io(0x43, Some(0xb0), 3000); // channel 2, lobyte/hibyte, mode 0
    t.io(0x42, Some(200), 3000);
    t.io(0x42, Some(0), 3000);
    expect("channel 2 output low while counting", t.io(0x61, None, 3199).is_some_and(|v| v & 0x20 == 0))?;
    expect(
        "channel 2 output high at the terminal count",
        t.io(0x61, None, 3200).is_some_and(|v| v & 0x20 != 0),
    )?;
    let lo = t.io(0x42, None, 3010).unwrap_or(0);
    expect("unlatched read gives the running count's low byte", lo == 190)?;
    Ok(n)
}

/// The UART checks Linux's 8250 autoconfig and startup make (drivers/tty/serial/8250).
fn check_serial() -> Result<usize, String> {
    let mut u = Serial::new();
    let mut printed = alloc::vec::Vec::new();
    let mut io =
        |u: &mut Serial, reg: u16, v: Option<u8>| u.io(0x3f8 + reg, v, &mut |l| printed.push(l.len()));
    let mut n = 0;
    let mut expect = |what: &str, ok: bool| {
        n += 1;
        if ok {
            Ok(())
        } else {
            Err(format!("UART: {what}"))
        }
    };
    io(&mut u, 1, Some(0x0f));
    expect("IER keeps its 4 bits", io(&mut u, 1, None) == Some(0x0f))?;
    io(&mut u, 1, Some(0));
    io(&mut u, 4, Some(0x1a)); // loopback with RTS and OUT2
    expect("loopback MSR 0x90", io(&mut u, 6, None).map(|v| v & 0xf0) == Some(0x90))?;
    io(&mut u, 4, Some(0x0b)); // DTR, RTS, OUT2
    io(&mut u, 2, Some(0x01)); // FIFO enable: a 16450 has none
    expect("no FIFO in IIR", io(&mut u, 2, None).map(|v| v & 0xc0) == Some(0))?;
    io(&mut u, 3, Some(0x83));
    io(&mut u, 0, Some(0x01));
    io(&mut u, 1, Some(0x00));
    expect("divisor latch reads back", io(&mut u, 0, None) == Some(1))?;
    io(&mut u, 3, Some(0x03));
    io(&mut u, 1, Some(0x02)); // THRI with the holding register empty
    expect("THRE interrupt raised on enabling", u.irq_line())?;
    expect("IIR reports THRE", io(&mut u, 2, None) == Some(0x02))?;
    expect("reading IIR clears it", !u.irq_line() && io(&mut u, 2, None) == Some(0x01))?;
    for b in b"ok\n" {
        io(&mut u, 0, Some(*b));
    }
    expect("a transmitted byte raises THRE again", u.irq_line())?;
    expect("LSR: transmitter empty", io(&mut u, 5, None) == Some(0x60))?;
    expect("a line reaches the console", printed == [2])?;
    Ok(n)
}

/// A module-header line and the (offset, size) it must parse to.
type HeaderCase<'a> = (&'a [u8], Option<(u64, u64)>);

fn check_e820_and_header() -> Result<usize, String> {
    let mut map = [E820 { addr: 0, size: 0, kind: 0 }; 8];
    let n = e820_from_slots(&[(0, 128 << 20)], &mut map);
    let want = [
        E820 { addr: 0, size: 0x9fc00, kind: E820_RAM },
        E820 { addr: 0x9fc00, size: 0x100000 - 0x9fc00, kind: E820_RESERVED },
        E820 { addr: 0x100000, size: (128 << 20) - 0x100000, kind: E820_RAM },
    ];
    if map[..n] != want {
        return Err(format!("e820 of one 128 MiB slot: {:x?}", &map[..n]));
    }
    let cases: [HeaderCase<'_>; 4] = [
        (b"kernel 1000 7dd7c0\nrest", Some((0x1000, 0x7dd7c0))),
        (b"kernel 1000\n", None),
        (b"kernel 1000 zz\n", None),
        (b"kernel 1000 2 3\n", None),
    ];
    for (text, want) in cases {
        if blob::parse_line(text, b"kernel").map(|(v, _)| v) != want {
            return Err(format!("module header line {:?}", core::str::from_utf8(text)));
        }
    }
    Ok(1 + cases.len())
}

/// Runs every check: the number passed, or the first failure.
pub fn run() -> Result<String, String> {
    let d = check_decoder()?;
    let r = check_stos()?;
    let p = check_pic()?;
    let t = check_pit()?;
    let u = check_serial()?;
    let e = check_e820_and_header()?;
    Ok(format!(
        "{} checks: mov decoder {d}, stos decoder {r}, 8259A {p}, 8254 {t}, 16450 {u}, e820 and module header {e}",
        d + r + p + t + u + e
    ))
}
