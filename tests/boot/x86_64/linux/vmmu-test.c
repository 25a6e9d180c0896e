/*
 * The guest's test program (static, run by /init in the initramfs).
 *
 * Rounds of work until the hypervisor says its live phases are done (at least MIN_ROUNDS,
 * at most MAX_ROUNDS):
 * each round forks WORKERS processes that map anonymous memory, write a pattern, read it
 * back and unmap it, and write, read back and remove a file on tmpfs (page cache). The
 * parent keeps a known region filled from a fixed generator; at the end it prints its
 * checksum and reports it, with the error count as the verdict, to the hypervisor.
 *
 * The hypervisor's test port (a port range it emulates, like QEMU's isa-debug-exit):
 *   out 0x5f0 <- 1: the workload runs (the hypervisor may start its live phases)
 *   in  0x5f0 -> 1 once the hypervisor's live phases are done
 *   out 0x5f4 <- checksum, low 32 bits, then high 32 bits
 *   out 0x5f8 <- verdict: the number of errors (0 passes); the hypervisor ends the run
 *
 * First it sleeps 100 ms (the guest idles: HLT until the timer interrupt) and checks the
 * time that passed. It also maps guest-physical ABSENT_PA (outside every memslot) through /dev/mem: loads
 * must read all ones and stores must vanish, as on a bus where nothing decodes the address.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ABSENT_PA 0xc0000000ul
#define PORT_STATE 0x5f0
#define PORT_SUM 0x5f4
#define PORT_VERDICT 0x5f8
#define WORKERS 4
#define MIN_ROUNDS 3
#define MAX_ROUNDS 400
#define KNOWN_BYTES (1u << 20)
#define MAP_BYTES (2u << 20)
#define FILE_BYTES (256u << 10)

static uint64_t lcg(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return *s >> 16;
}

/* FNV-1a over 64-bit words; the hypervisor computes the same over the same generator. */
static uint64_t checksum(const uint64_t *w, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= w[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static int check_anon(unsigned seed)
{
	uint64_t *p = mmap(NULL, MAP_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	size_t n = MAP_BYTES / 8;
	uint64_t s = seed;
	for (size_t i = 0; i < n; i += 7)
		p[i] = lcg(&s) ^ i;
	s = seed;
	int bad = 0;
	for (size_t i = 0; i < n; i += 7)
		bad += p[i] != (lcg(&s) ^ i);
	if (munmap(p, MAP_BYTES))
		bad++;
	return bad != 0;
}

static int check_file(unsigned seed)
{
	char path[64];
	snprintf(path, sizeof path, "/tmp/vmmu-%u", seed);
	static uint32_t buf[FILE_BYTES / 4], back[FILE_BYTES / 4];
	uint64_t s = seed;
	for (size_t i = 0; i < FILE_BYTES / 4; i++)
		buf[i] = (uint32_t)lcg(&s);
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0600);
	if (fd < 0)
		return 1;
	int bad = write(fd, buf, sizeof buf) != (ssize_t)sizeof buf;
	bad |= lseek(fd, 0, SEEK_SET) != 0;
	bad |= read(fd, back, sizeof back) != (ssize_t)sizeof back;
	bad |= memcmp(buf, back, sizeof buf) != 0;
	/* The same page cache seen through a shared mapping. */
	uint32_t *m = mmap(NULL, FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		bad = 1;
	} else {
		bad |= memcmp(m, buf, sizeof buf) != 0;
		m[7] ^= 0x5a5a5a5a;
		bad |= pread(fd, back, 64, 0) != 64 || back[7] != (buf[7] ^ 0x5a5a5a5a);
		munmap(m, FILE_BYTES);
	}
	close(fd);
	bad |= unlink(path) != 0;
	return bad;
}

/* Loads and stores of several widths at an address nothing decodes. */
static int check_absent(void)
{
	int fd = open("/dev/mem", O_RDWR | O_SYNC);
	if (fd < 0) {
		printf("vmmu-test: /dev/mem: errno %d\n", errno);
		return 1;
	}
	volatile uint8_t *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, ABSENT_PA);
	close(fd);
	if (p == MAP_FAILED) {
		printf("vmmu-test: mmap of /dev/mem at %#lx: errno %d\n", ABSENT_PA, errno);
		return 1;
	}
	volatile uint32_t *w = (volatile uint32_t *)p;
	volatile uint64_t *q = (volatile uint64_t *)p;
	int bad = 0;
	uint32_t before = w[1];
	w[1] = 0x12345678;
	uint32_t after = w[1];
	p[9] = 0x5a;
	uint8_t byte = p[9];
	uint64_t quad = q[3];
	bad = before != 0xffffffffu || after != 0xffffffffu || byte != 0xff || quad != ~0ull;
	printf("vmmu-test: absent memory at %#lx reads %08x, %08x after a store, byte %02x, quad %016llx\n",
	       ABSENT_PA, before, after, byte, (unsigned long long)quad);
	munmap((void *)p, 4096);
	return bad;
}

/* An idle guest: the kernel halts until its timer (the PIT) wakes it after 100 ms. */
static int check_sleep(void)
{
	struct timespec a, b, d = {0, 100 * 1000 * 1000};
	clock_gettime(CLOCK_MONOTONIC, &a);
	nanosleep(&d, NULL);
	clock_gettime(CLOCK_MONOTONIC, &b);
	long ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
	printf("vmmu-test: a 100 ms sleep took %ld ms\n", ms);
	return ms < 100 || ms > 5000;
}

static int worker(unsigned seed)
{
	return check_anon(seed) | check_file(seed);
}

int main(void)
{
	if (ioperm(PORT_STATE, 12, 1)) {
		printf("vmmu-test: ioperm failed (errno %d)\n", errno);
		return 1;
	}
	uint64_t *known = malloc(KNOWN_BYTES);
	if (!known)
		return 1;
	uint64_t s = 0x766d6d75; /* "vmmu" */
	for (size_t i = 0; i < KNOWN_BYTES / 8; i++)
		known[i] = lcg(&s);
	printf("vmmu-test: %d workers per round, %u KiB anonymous and %u KiB tmpfs each\n", WORKERS,
	       MAP_BYTES >> 10, FILE_BYTES >> 10);
	unsigned errors = check_absent() + check_sleep(), rounds = 0, forks = 0;
	outl(1, PORT_STATE);
	while (rounds < MIN_ROUNDS || (rounds < MAX_ROUNDS && inl(PORT_STATE) != 1)) {
		pid_t pids[WORKERS];
		for (int w = 0; w < WORKERS; w++) {
			pids[w] = fork();
			if (pids[w] == 0)
				_exit(worker(rounds * WORKERS + w + 1));
			if (pids[w] < 0)
				errors++;
			else
				forks++;
		}
		for (int w = 0; w < WORKERS; w++) {
			int st;
			if (pids[w] > 0 && (waitpid(pids[w], &st, 0) != pids[w] || !WIFEXITED(st) || WEXITSTATUS(st)))
				errors++;
		}
		rounds++;
	}
	uint64_t sum = checksum(known, KNOWN_BYTES / 8);
	printf("vmmu-test: %u rounds, %u processes forked, %u errors, checksum of the known region %016llx\n",
	       rounds, forks, errors, (unsigned long long)sum);
	fflush(stdout);
	outl((uint32_t)sum, PORT_SUM);
	outl((uint32_t)(sum >> 32), PORT_SUM);
	outl(errors, PORT_VERDICT);
	return errors != 0;
}
