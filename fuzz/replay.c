/*
 * replay.c — the main() of every fuzz/replay_<target>: run the target
 * over each file named on the command line (the corpus), so an input
 * that once crashed stays a test in every build, libFuzzer or not.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv) {
  int n = 0;
  for (int i = 1; i < argc; i++) {
    FILE *f = fopen(argv[i], "rb");
    if (f == NULL) {
      perror(argv[i]);
      return 1;
    }
    static uint8_t buf[1 << 16];
    size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    LLVMFuzzerTestOneInput(buf, len);
    n++;
  }
  printf("%s: %d inputs replayed\n", argv[0], n);
  return 0;
}
