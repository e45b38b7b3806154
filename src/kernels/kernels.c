/* Kernel table selection.
 *
 * A table may only be used when both the CPU implements its instructions and the OS saves the
 * registers they touch across context switches: CPUID alone is not enough (a kernel or hypervisor
 * can disable AVX-512 state in XCR0, and then the first ZMM instruction faults). So on x86-64 we
 * check the CPUID feature bits that the file's -m flags allow the compiler to use, then XCR0 via
 * xgetbv for the SSE/AVX (and opmask/ZMM) state. On aarch64 the kernel's hwcaps say the same
 * thing in one word.
 *
 * Two pthread_once stages: `detect` builds the completed tables (pure CPU facts), `select` reads
 * DS_ISA and picks one. Keeping them apart lets ds_kernels_for() be used without freezing the
 * choice that ds_kernels_get() makes later (tests fork children with different DS_ISA values).
 * After the once stages everything here is read-only, so any thread may call any function. */
#include "kernels/kernels_isa.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(DS_KERNELS_X86)
#include <cpuid.h>
#endif
#if defined(DS_KERNELS_NEON) && defined(__linux__)
#include <sys/auxv.h>
#endif

enum { ISA_SCALAR, ISA_AVX2, ISA_AVX512, ISA_NEON, ISA_COUNT };
static const char *const isa_names[ISA_COUNT] = {"scalar", "avx2", "avx512", "neon"};

/* Written once by detect() / select_table() under pthread_once, read-only afterwards. */
static ds_kernels tables[ISA_COUNT];
static int have[ISA_COUNT];
static const ds_kernels *selected;
static size_t l2_bytes; /* per core; 0: unknown */
static pthread_once_t detect_once = PTHREAD_ONCE_INIT;
static pthread_once_t select_once = PTHREAD_ONCE_INIT;

#if defined(DS_KERNELS_X86)
static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    /* the mnemonic, not _xgetbv(): the intrinsic would need -mxsave on this plain-flags file */
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* Which of the x86 tables may run here. */
static void x86_features(int *avx2, int *avx512) {
    unsigned a, b, c, d;
    *avx2 = *avx512 = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return;
    uint64_t xcr0 = read_xcr0();
    int ymm_state = (xcr0 & 0x6) == 0x6;   /* XMM | YMM */
    int zmm_state = (xcr0 & 0xe0) == 0xe0; /* opmask | ZMM_Hi256 | Hi16_ZMM */
    if (__get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    int has_avx2 = (b >> 5) & 1;
    int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    int vnni = (c >> 11) & 1;
    *avx2 = ymm_state && has_avx2 && fma && f16c;
    /* kernels_avx512.c is compiled with the AVX2 set too, so it needs all of it */
    *avx512 = *avx2 && zmm_state && f && dq && bw && vl && vnni;
}
#endif

#if defined(DS_KERNELS_NEON)
/* kernels_neon.c is built with -march=armv8.2-a+dotprod+fp16, so the compiler may use any of
 * those; require every one rather than trust that it did not. */
static int neon_ok(void) {
#if defined(__linux__)
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1UL << 9)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1UL << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
    unsigned long need = HWCAP_ASIMD | HWCAP_FPHP | HWCAP_ASIMDHP | HWCAP_ASIMDDP;
    return (getauxval(AT_HWCAP) & need) == need;
#else
    return 1; /* Apple silicon and other aarch64 targets without hwcaps: all have them */
#endif
}
#endif

/* A SIMD table with its NULL slots taken from scalar. */
static void complete(ds_kernels *dst, const ds_kernels *src) {
    const ds_kernels *s = ds_kernels_scalar();
    *dst = *src;
    if (!dst->name) dst->name = "unnamed";
    if (!dst->bf16_to_f32) dst->bf16_to_f32 = s->bf16_to_f32;
    if (!dst->f16_to_f32) dst->f16_to_f32 = s->f16_to_f32;
    if (!dst->fp8_to_f32) dst->fp8_to_f32 = s->fp8_to_f32;
    if (!dst->i8_to_f32) dst->i8_to_f32 = s->i8_to_f32;
    if (!dst->i4_to_f32) dst->i4_to_f32 = s->i4_to_f32;
    if (!dst->i8_to_f32_lanes) dst->i8_to_f32_lanes = s->i8_to_f32_lanes;
    if (!dst->absmax_f32) dst->absmax_f32 = s->absmax_f32;
    if (!dst->argmax_f32) dst->argmax_f32 = s->argmax_f32;
    if (!dst->swiglu_f32) dst->swiglu_f32 = s->swiglu_f32;
    if (!dst->exp_f32) dst->exp_f32 = s->exp_f32;
    if (!dst->softmax16_f32) dst->softmax16_f32 = s->softmax16_f32;
    if (!dst->rmsnorm_f32) dst->rmsnorm_f32 = s->rmsnorm_f32;
    if (!dst->bf16_split) dst->bf16_split = s->bf16_split;
    if (!dst->quantize_i8) dst->quantize_i8 = s->quantize_i8;
    if (!dst->sum_i8) dst->sum_i8 = s->sum_i8;
    if (!dst->dot_f32) dst->dot_f32 = s->dot_f32;
    if (!dst->dot4_f32) dst->dot4_f32 = s->dot4_f32;
    if (!dst->axpy_f32) dst->axpy_f32 = s->axpy_f32;
    if (!dst->axpy_i8) dst->axpy_i8 = s->axpy_i8;
    if (!dst->axpy_bf16) dst->axpy_bf16 = s->axpy_bf16;
    if (!dst->dot4_bf16) dst->dot4_bf16 = s->dot4_bf16;
    if (!dst->dot4_f16) dst->dot4_f16 = s->dot4_f16;
    if (!dst->dot4_fp8) dst->dot4_fp8 = s->dot4_fp8;
    if (!dst->dot4xn_bf16) dst->dot4xn_bf16 = s->dot4xn_bf16;
    if (!dst->dot4x2_f16) dst->dot4x2_f16 = s->dot4x2_f16;
    if (!dst->dot4x2_fp8) dst->dot4x2_fp8 = s->dot4x2_fp8;
    if (!dst->dot4_i8) dst->dot4_i8 = s->dot4_i8;
    if (!dst->dot4_i4) dst->dot4_i4 = s->dot4_i4;
    if (!dst->pack16_i8) dst->pack16_i8 = s->pack16_i8;
    if (!dst->pack16_i4) dst->pack16_i4 = s->pack16_i4;
    if (!dst->gemm16x8_i8) dst->gemm16x8_i8 = s->gemm16x8_i8;
    if (!dst->gemm32x8_i8) dst->gemm32x8_i8 = s->gemm32x8_i8;
    if (!dst->pack16_f32) dst->pack16_f32 = s->pack16_f32;
    if (!dst->pack16_bf16) dst->pack16_bf16 = s->pack16_bf16;
    if (!dst->pack16_i8_f32) dst->pack16_i8_f32 = s->pack16_i8_f32;
    if (!dst->gemm16x8_f32) dst->gemm16x8_f32 = s->gemm16x8_f32;
    if (!dst->gemm32x8_f32_rows) dst->gemm32x8_f32_rows = s->gemm32x8_f32_rows;
    if (!dst->gemm128x1_f32) dst->gemm128x1_f32 = s->gemm128x1_f32;
    if (!dst->axpy_rows_i8_lanes) dst->axpy_rows_i8_lanes = s->axpy_rows_i8_lanes;
    if (!dst->axpy_rows_i8) dst->axpy_rows_i8 = s->axpy_rows_i8;
    if (!dst->axpy_rows_bf16) dst->axpy_rows_bf16 = s->axpy_rows_bf16;
}

static void detect(void) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE); /* glibc: from CPUID on x86, 0 where unknown */
    l2_bytes = l2 > 0 ? (size_t)l2 : 0;
#endif
    complete(&tables[ISA_SCALAR], ds_kernels_scalar());
    have[ISA_SCALAR] = 1;
#if defined(DS_KERNELS_X86)
    int avx2, avx512;
    x86_features(&avx2, &avx512);
    if (avx2) {
        complete(&tables[ISA_AVX2], ds_kernels_avx2_table());
        have[ISA_AVX2] = 1;
    }
    if (avx512) {
        complete(&tables[ISA_AVX512], ds_kernels_avx512_table());
        have[ISA_AVX512] = 1;
    }
#endif
#if defined(DS_KERNELS_NEON)
    if (neon_ok()) {
        complete(&tables[ISA_NEON], ds_kernels_neon_table());
        have[ISA_NEON] = 1;
    }
#endif
}

static int best_isa(void) {
    static const int order[] = {ISA_AVX512, ISA_AVX2, ISA_NEON};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (have[order[i]]) return order[i];
    return ISA_SCALAR;
}

static int isa_index(const char *name) {
    for (int i = 0; i < ISA_COUNT; i++)
        if (strcmp(name, isa_names[i]) == 0) return i;
    return -1;
}

static void select_table(void) {
    pthread_once(&detect_once, detect);
    int pick = best_isa();
    const char *env = getenv("DS_ISA");
    if (env && *env) {
        int i = isa_index(env);
        if (i < 0)
            ds_warn("DS_ISA=%s is not one of scalar|avx2|avx512|neon; using %s", env,
                    isa_names[pick]);
        else if (!have[i])
            ds_warn("DS_ISA=%s cannot run on this CPU or build; using %s", env, isa_names[pick]);
        else
            pick = i;
    }
    selected = &tables[pick];
    ds_debug("kernels: using the %s table", selected->name);
}

const ds_kernels *ds_kernels_get(void) {
    pthread_once(&select_once, select_table);
    return selected;
}

size_t ds_kernels_l2_bytes(void) {
    pthread_once(&detect_once, detect);
    return l2_bytes;
}

int ds_kernels_fgemm_native(const ds_kernels *k) {
    return DS_KERNELS_OWN(k, gemm16x8_f32) && DS_KERNELS_OWN(k, gemm32x8_f32_rows) &&
           DS_KERNELS_OWN(k, gemm128x1_f32);
}

const ds_kernels *ds_kernels_for(const char *isa) {
    if (!isa) return NULL;
    pthread_once(&detect_once, detect);
    int i = isa_index(isa);
    return i >= 0 && have[i] ? &tables[i] : NULL;
}
