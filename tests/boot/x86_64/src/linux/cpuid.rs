//! What CPUID tells the Linux guest: the host's values, filtered to what this VMM gives
//! (AMD APM Vol. 3, appendix E; Intel SDM Vol. 2A, CPUID). Removed: SVM and VMX (no nested
//! virtualization), the local APIC and x2APIC (none is emulated: the guest uses the PIC),
//! MONITOR/MWAIT, XSAVE (no XCR0 handling), MTRRs, MCE/MCA (no such MSRs are emulated),
//! TSC deadline, RDTSCP (no TSC_AUX), PCID/INVPCID-related bits, performance monitoring and
//! the debug store, and the SVM feature leaf. Added: the hypervisor-present bit and a
//! hypervisor leaf 0x4000_0000 with the signature "vmmuvmmuvmmu" (Linux knows no such
//! hypervisor and treats the machine as bare hardware; no paravirtual interface exists).

use crate::port::cpuid;

/// Leaf 1 ECX bits removed: VMX 5, SMX 6, EST 7, TM2 8, SDBG 11, PDCM 15, PCID 17,
/// x2APIC 21, TSC deadline 24, XSAVE 26, OSXSAVE 27, MONITOR 3, DTES64 2, DS-CPL 4.
const L1_ECX_DROP: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 15)
    | (1 << 17)
    | (1 << 21)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27);
/// Leaf 1 ECX: hypervisor present.
const L1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bits removed: MCE 7, APIC 9, MTRR 12, MCA 14, PSN 18, DS 21, ACPI 22, TM 29,
/// PBE 31.
const L1_EDX_DROP: u32 =
    (1 << 7) | (1 << 9) | (1 << 12) | (1 << 14) | (1 << 18) | (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
/// Leaf 0x8000_0001 ECX removed: SVM 2, ExtApicSpace 3, IBS 10, SKINIT 12, WDT 13, LWP 15,
/// TopologyExtensions 22, PerfCtrExtCore 23, PerfCtrExtNB 24, DataBreakpoint 26, PerfTsc 27,
/// PerfCtrExtLLC 28, MONITORX 29.
const E1_ECX_DROP: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 10)
    | (1 << 12)
    | (1 << 13)
    | (1 << 15)
    | (1 << 22)
    | (1 << 23)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29);
/// Leaf 0x8000_0001 EDX removed: RDTSCP 27.
const E1_EDX_DROP: u32 = 1 << 27;

/// "vmmu" in a register, as CPUID returns a signature (little-endian bytes).
const SIGNATURE: u32 = u32::from_le_bytes(*b"vmmu");

/// The guest's view of CPUID leaf `leaf`, sub-leaf `sub`.
pub fn guest_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let max_basic = cpuid(0, 0).0.min(0xd);
    let max_ext = cpuid(0x8000_0000, 0).0.min(0x8000_0008);
    let (a, b, c, d) = cpuid(leaf, sub);
    match leaf {
        0 => [max_basic, b, c, d],
        1 => {
            // EBX: keep the CLFLUSH size, one logical processor, APIC ID 0.
            let ebx = (b & 0xff00) | (1 << 16);
            [a, ebx, (c & !L1_ECX_DROP) | L1_ECX_HYPERVISOR, d & !L1_EDX_DROP]
        }
        // Leaf 7: structured extended features; drop INVPCID (10), RTM/HLE (11, 4), PQM/PQE
        // (12, 15), Intel PT (25); keep the rest the host has.
        7 if sub == 0 => {
            [0, b & !((1 << 4) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 15) | (1 << 25)), c, 0]
        }
        // Thermal/power, performance monitoring, topology, XSAVE state: none.
        6 | 0xa | 0xb | 0xd => [0; 4],
        2..=5 | 8 | 9 | 0xc if leaf <= max_basic => [a, b, c, d],
        0x4000_0000 => [0x4000_0000, SIGNATURE, SIGNATURE, SIGNATURE],
        0x8000_0000 => [max_ext, b, c, d],
        0x8000_0001 => [a, b, c & !E1_ECX_DROP, d & !E1_EDX_DROP],
        0x8000_0002..=0x8000_0008 if leaf <= max_ext => [a, b, c, d],
        _ => [0; 4],
    }
}
