// Ternary GEMV/GEMM microbenchmark, AVX2: int32 widening per chunk (the intrinsic today) vs int16 sums across chunks.
// gcc -O3 -mavx2 -mfma -o /tmp/k docs/speculative/int16_sums_avx2.c && /tmp/k   (single thread; edit K for 1536)
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define M 1536
#define K 512
#define CH (K / 256)
static uint8_t W[M * K / 4] __attribute__((aligned(64)));
static int8_t X[2][4 * K / 4] __attribute__((aligned(64)));  // per token: [chunk][4][64]
static int32_t Y[2][M];
static inline __m256i planes(__m256i w, const int8_t *x) {
  const __m256i m = _mm256_set1_epi16(0x0303);
  __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(w, m), _mm256_load_si256((const __m256i *)x));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 2), m), _mm256_load_si256((const __m256i *)(x + 64))));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m), _mm256_load_si256((const __m256i *)(x + 128))));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 6), m), _mm256_load_si256((const __m256i *)(x + 192))));
  return s;
}
static inline int32_t hsum(__m256i v) {
  __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e)); a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
  return _mm_cvtsi128_si32(a);
}
#define R 4
// One loop nest, two accumulations: ACC(acc, w, x) per 32 bytes of a row and a token, DONE(acc) before the lane sum.
#define GEMM(NAME, ACC, DONE)                                                                           \
  __attribute__((noinline)) void NAME(int N) {                                                          \
    const __m256i one = _mm256_set1_epi16(1);                                                           \
    (void)one;                                                                                          \
    for (int m0 = 0; m0 < M; m0 += R) {                                                                 \
      __m256i acc[R][2] = {0};                                                                          \
      for (int c = 0; c < CH; c++)                                                                      \
        for (int h = 0; h < 2; h++)                                                                     \
          for (int r = 0; r < R; r++) {                                                                 \
            __m256i w = _mm256_load_si256((const __m256i *)(W + (size_t)(m0 + r) * (K / 4) + c * 64 + h * 32)); \
            for (int n = 0; n < N; n++) acc[r][n] = ACC(acc[r][n], w, X[n] + c * 256 + h * 32);       \
          }                                                                                             \
      for (int r = 0; r < R; r++)                                                                       \
        for (int n = 0; n < N; n++) Y[n][m0 + r] = hsum(DONE(acc[r][n]));                               \
    }                                                                                                   \
  }
// today: widen every chunk's int16 pair sums to int32 (vpmaddwd by ones) and add
#define ACC32(a, w, x) _mm256_add_epi32(a, _mm256_madd_epi16(planes(w, x), one))
#define DONE32(a) (a)
// int16 sums across chunks (K/256 <= 15 here: exact), widened once at the end
#define ACC16(a, w, x) _mm256_add_epi16(a, planes(w, x))
#define DONE16(a) _mm256_madd_epi16(a, _mm256_set1_epi16(1))
GEMM(gemm32, ACC32, DONE32)
GEMM(gemm16, ACC16, DONE16)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
int main(void) {
  srand(1);
  for (size_t i = 0; i < sizeof W; i++) { uint8_t b = 0; for (int j = 0; j < 4; j++) b |= (rand() % 3) << (2 * j); W[i] = b; }
  for (int n = 0; n < 2; n++) for (int i = 0; i < K; i++) X[n][i] = (int8_t)(rand() % 255 - 127);
  int32_t ref[2][M];
  gemm32(2); memcpy(ref, Y, sizeof ref); gemm16(2);
  if (memcmp(ref, Y, sizeof ref)) { puts("MISMATCH"); return 1; }
  const int it = 2000, runs = 7;
  for (int N = 1; N <= 2; N++) {
    double t32[7], t16[7];
    for (int r = 0; r < runs; r++) {
      double t = now(); for (int i = 0; i < it; i++) gemm32(N); t32[r] = (now() - t) / it * 1e6;
      t = now(); for (int i = 0; i < it; i++) gemm16(N); t16[r] = (now() - t) / it * 1e6;
    }
    double ratio[7]; for (int r = 0; r < runs; r++) ratio[r] = t16[r] / t32[r];
    qsort(t32, runs, 8, cmp); qsort(t16, runs, 8, cmp); qsort(ratio, runs, 8, cmp);
    printf("N=%d M=%d K=%d: int32-per-chunk %.2f us [%.2f-%.2f], int16-across %.2f us [%.2f-%.2f], ratio %.3f [%.3f-%.3f]\n", N, M, K,
           t32[3], t32[0], t32[6], t16[3], t16[0], t16[6], ratio[3], ratio[0], ratio[6]);
  }
  return 0;
}
