/*
 * isa_check.h: the tests that run once per CPU instruction set level
 * (meson sets KVRT_CPU_ISA for each) call test_isa_check() first: it says
 * which level runs, and gives 77 (a skip) when the level asked for is above
 * what the processor has (its run would repeat a lower level's), 1 when
 * KVRT_CPU_ISA is not a level, else 0.
 */
#ifndef KVRT_TEST_ISA_CHECK_H
#define KVRT_TEST_ISA_CHECK_H

#include <stdio.h>

#include "kvrt.h"

static inline int test_isa_check(const char *prog)
{
    kvrt_cpu_isa_info info;
    kvrt_cpu_isa_get(&info);
    if (info.requested == -2) {
        fprintf(stderr, "%s: KVRT_CPU_ISA=%s is not portable, avx2 or avx512\n", prog, info.env);
        return 1;
    }
    if (info.requested > (int)info.machine) {
        printf("%s: KVRT_CPU_ISA=%s, but this processor's widest is %s: skipped\n", prog,
               info.env, kvrt_cpu_isa_name(info.machine));
        return 77;
    }
    printf("%s: CPU kernels at %s (processor: %s)\n", prog, kvrt_cpu_isa_name(info.used),
           kvrt_cpu_isa_name(info.machine));
    return 0;
}

#endif /* KVRT_TEST_ISA_CHECK_H */
