/*
 * cpu_isa.c: which instruction set the CPU kernels run. The processor is
 * asked once (cpuid can cost microseconds), and KVRT_CPU_ISA read once, at
 * the first call; every kernel then takes the same level for the life of
 * the process.
 */
#include "cpu_isa.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#  include <cpuid.h>
#  define KVRT_ISA_X86 1
#else
#  define KVRT_ISA_X86 0
#endif

static pthread_once_t isa_once = PTHREAD_ONCE_INIT;
static kvrt_cpu_isa_info isa;

/* The widest level this processor runs, the OS saving its registers
 * included (which __builtin_cpu_supports checks). AVX2 needs FMA and F16C
 * with it; AVX-512 needs F, BW and VL. */
static kvrt_cpu_isa machine_level(void)
{
#if KVRT_ISA_X86
    unsigned eax, ebx, ecx, edx;
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    if (!avx2)
        return KVRT_CPU_ISA_PORTABLE;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return KVRT_CPU_ISA_AVX512;
    return KVRT_CPU_ISA_AVX2;
#else
    return KVRT_CPU_ISA_PORTABLE;
#endif
}

static void isa_init(void)
{
    isa.machine = machine_level();
    isa.used = isa.machine;
    isa.requested = -1;
    const char *env = getenv("KVRT_CPU_ISA");
    if (env == NULL)
        return;
    strncpy(isa.env, env, sizeof isa.env - 1);
    isa.requested = -2;
    for (int level = KVRT_CPU_ISA_PORTABLE; level <= KVRT_CPU_ISA_AVX512; level++)
        if (strcmp(env, kvrt_cpu_isa_name((kvrt_cpu_isa)level)) == 0)
            isa.requested = level;
    if (isa.requested >= 0 && isa.requested < (int)isa.machine)
        isa.used = (kvrt_cpu_isa)isa.requested;
}

void kvrt_cpu_isa_get(kvrt_cpu_isa_info *info)
{
    pthread_once(&isa_once, isa_init);
    *info = isa;
}

int kvrt_cpu_isa_level(void)
{
    pthread_once(&isa_once, isa_init);
    return (int)isa.used;
}

const char *kvrt_cpu_isa_name(kvrt_cpu_isa level)
{
    switch (level) {
    case KVRT_CPU_ISA_PORTABLE: return "portable";
    case KVRT_CPU_ISA_AVX2: return "avx2";
    case KVRT_CPU_ISA_AVX512: return "avx512";
    }
    return "unknown";
}
