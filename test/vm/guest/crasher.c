/* The guest's crashing program: waits for a line on stdin (so the test can find it and release many at
 * once), then dies in a named function. Built statically on the host: the guest has no compiler. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char filler[2 << 20];

__attribute__((noinline)) void crash_in_segv_function(volatile int *p) { *p = 42; }
__attribute__((noinline)) void crash_in_abort_function(void) { abort(); }

int main(int argc, char **argv) {
    unsigned x = 12345;
    for (size_t i = 0; i < sizeof filler; i++) { x = x * 1103515245 + 12345; filler[i] = x >> 16; }
    if (argc > 2 && strcmp(argv[2], "wait") == 0) {
        char buf[8];
        if (read(0, buf, sizeof buf) < 0) return 3;
    }
    if (argc > 1 && strcmp(argv[1], "abort") == 0) crash_in_abort_function();
    crash_in_segv_function((volatile int *)0);
    return filler[5];
}
