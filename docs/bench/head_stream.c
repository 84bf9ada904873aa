/* The F16 LM head's read pattern at the 2B-4T shape (128256 x 2560), outside TVM: does streaming one head row per
 * accumulator (16 rows side by side, the row layout) or one 16-row block after another (the blocked layout of
 * compiler.graph_kernels.tile_head) reach the machine's streaming-read rate? Exploratory, not a benchmark CLI: it
 * decided the layout; the figures that count are the compiled model's (docs/foreign_models.md, "The LM head").
 *
 *     gcc -O3 -march=native -fopenmp docs/bench/head_stream.c -o /tmp/head_stream && OMP_NUM_THREADS=2 /tmp/head_stream
 *
 * Prints GB/s of 9 back-to-back calls each of: rows (16 interleaved row streams per tile), blocked (one sequential
 * stream per tile), read (a sum over an array of the same size: the roof), each on huge pages. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#define V 128256
#define D 2560
static float out[V];
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
__attribute__((noinline)) static void head_rows(const uint16_t *E, const float *h) {
#pragma omp parallel for schedule(static)
    for (int vo = 0; vo < V / 16; vo++) {
        __m512 a[16];
        for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_ps();
        for (int io = 0; io < D / 16; io++) {
            __m512 hv = _mm512_loadu_ps(h + io * 16);
            for (int k = 0; k < 16; k++) {
                const uint16_t *p = E + (size_t)(vo * 16 + k) * D + io * 16;
                a[k] = _mm512_fmadd_ps(hv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)), a[k]);
            }
        }
        for (int k = 0; k < 16; k++) out[vo * 16 + k] = _mm512_reduce_add_ps(a[k]);
    }
}
__attribute__((noinline)) static void head_blocked(const uint16_t *E, const float *h) {
#pragma omp parallel for schedule(static)
    for (int vo = 0; vo < V / 16; vo++) {
        __m512 a[16];
        const uint16_t *T = E + (size_t)vo * 16 * D;
        for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_ps();
        for (int io = 0; io < D / 16; io++) {
            __m512 hv = _mm512_loadu_ps(h + io * 16);
            for (int k = 0; k < 16; k++) {
                const uint16_t *p = T + io * 256 + k * 16;
                a[k] = _mm512_fmadd_ps(hv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)), a[k]);
            }
        }
        for (int k = 0; k < 16; k++) out[vo * 16 + k] = _mm512_reduce_add_ps(a[k]);
    }
}
__attribute__((noinline)) static long read_sum(const int32_t *X, size_t n) {
    long tot = 0;
#pragma omp parallel
    {
        __m512i s = _mm512_setzero_si512();
#pragma omp for schedule(static)
        for (size_t i = 0; i < n; i += 16) s = _mm512_add_epi32(s, _mm512_loadu_si512(X + i));
#pragma omp atomic
        tot += _mm512_reduce_add_epi32(s);
    }
    return tot;
}
int main(void) {
    size_t nb = (size_t)V * D * 2;
    uint16_t *E = aligned_alloc(1 << 21, nb);
    int32_t *X = aligned_alloc(1 << 21, nb);
    madvise(E, nb, MADV_HUGEPAGE);
    madvise(X, nb, MADV_HUGEPAGE);
    for (size_t i = 0; i < (size_t)V * D; i++) E[i] = 0x3c00; /* 1.0 */
    memset(X, 1, nb);
    static float h[D];
    for (int i = 0; i < D; i++) h[i] = 1;
    double r[3][9];
    for (int rep = 0; rep < 9; rep++) {
        double t = now();
        head_rows(E, h);
        r[0][rep] = nb / (now() - t) / 1e9;
        t = now();
        head_blocked(E, h);
        r[1][rep] = nb / (now() - t) / 1e9;
        t = now();
        volatile long s = read_sum(X, nb / 4);
        (void)s;
        r[2][rep] = nb / (now() - t) / 1e9;
    }
    const char *name[3] = {"rows", "blocked", "read"};
    for (int j = 0; j < 3; j++) {
        printf("%-8s", name[j]);
        for (int i = 0; i < 9; i++) printf(" %5.1f", r[j][i]);
        printf("  GB/s\n");
    }
    return 0;
}
