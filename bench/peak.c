/* The arithmetic ceiling of the AVX2 product kernels on this host, one thread: the 6 x 16 tile's inner loop
 * (12 accumulators, two b registers, one broadcast of a) with no memory traffic but the broadcasts, as f32
 * FMAs (kernel_f32_avx2) and as int16 pairs (vpmaddwd + vpaddd, kernel_i16_avx2). Written in assembly so
 * the compiler can neither spill the accumulators nor drop the work. x86-64 with AVX2 and FMA only.
 * Build and run: bench/peak.sh */
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int a[8] = {1, 2, 3, 4, 5, 6, 7, 8};

#define REGS "memory", "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm8", "ymm9", \
             "ymm10", "ymm11", "ymm12", "ymm13", "ymm14", "ymm15"
#define FMA(r, c0, c1) "vbroadcastss " #r "(%1), %%ymm14\n vfmadd231ps %%ymm12, %%ymm14, %%" #c0 "\n" \
                       " vfmadd231ps %%ymm13, %%ymm14, %%" #c1 "\n"
#define MADD(r, c0, c1) "vpbroadcastd " #r "(%1), %%ymm14\n vpmaddwd %%ymm12, %%ymm14, %%ymm15\n" \
                        " vpaddd %%ymm15, %%" #c0 ", %%" #c0 "\n vpmaddwd %%ymm13, %%ymm14, %%ymm15\n" \
                        " vpaddd %%ymm15, %%" #c1 ", %%" #c1 "\n"

int main(void) {
  const long steps = 200000000;
  long n = steps;
  double t = now();
  __asm__ volatile("1:\n" FMA(0, ymm0, ymm1) FMA(4, ymm2, ymm3) FMA(8, ymm4, ymm5) FMA(12, ymm6, ymm7)
                   FMA(16, ymm8, ymm9) FMA(20, ymm10, ymm11) "dec %0\n jnz 1b\n"
                   : "+r"(n) : "r"(a) : REGS);
  /* 12 FMAs of 8 lanes, 2 flops each, per step. */
  printf("peak f32 FMA (6x16 tile, 1 thread): %.1f GFLOP/s\n", steps * 12.0 * 8 * 2 / (now() - t) / 1e9);
  n = steps;
  t = now();
  __asm__ volatile("1:\n" MADD(0, ymm0, ymm1) MADD(4, ymm2, ymm3) MADD(8, ymm4, ymm5) MADD(12, ymm6, ymm7)
                   MADD(16, ymm8, ymm9) MADD(20, ymm10, ymm11) "dec %0\n jnz 1b\n"
                   : "+r"(n) : "r"(a) : REGS);
  /* 12 vpmaddwd of 16 multiply-adds, 2 flops each, per step. */
  printf("peak int16 vpmaddwd+vpaddd (6x16 tile, 1 thread): %.1f GFLOP/s\n",
         steps * 12.0 * 16 * 2 / (now() - t) / 1e9);
  /* Why the int16 pair is not twice the FMA rate although vpmaddwd does twice the multiply-adds: the two
   * instructions share the vector pipes. Each alone, 12 independent accumulators, in instructions per ns. */
#define PMADD(c) "vpmaddwd %%ymm12, %%ymm13, %%" #c "\n"
#define PADD(c) "vpaddd %%ymm13, %%" #c ", %%" #c "\n"
#define FMA1(c) "vfmadd231ps %%ymm12, %%ymm13, %%" #c "\n"
#define TWELVE(OP) OP(ymm0) OP(ymm1) OP(ymm2) OP(ymm3) OP(ymm4) OP(ymm5) OP(ymm6) OP(ymm7) OP(ymm8) \
                   OP(ymm9) OP(ymm10) OP(ymm11)
#define ALONE(OP, rate)                                                                                  \
  do {                                                                                                   \
    n = steps;                                                                                           \
    t = now();                                                                                           \
    __asm__ volatile("1:\n" TWELVE(OP) "dec %0\n jnz 1b\n" : "+r"(n) : "r"(a) : REGS);                  \
    rate = steps * 12.0 / (now() - t) / 1e9;                                                             \
  } while (0)
  double madd, add, fma;
  ALONE(PMADD, madd);
  ALONE(PADD, add);
  ALONE(FMA1, fma);
  printf("alone, instructions per ns: vpmaddwd %.2f, vpaddd %.2f, vfmadd231ps %.2f\n", madd, add, fma);
  return 0;
}
