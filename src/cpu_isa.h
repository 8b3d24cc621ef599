/*
 * cpu_isa.h: the instruction set the CPU kernels run (kvrt_cpu_isa_get).
 */
#ifndef KVRT_CPU_ISA_H
#define KVRT_CPU_ISA_H

#include "kvrt.h"

/* The level the CPU kernels run (a kvrt_cpu_isa): the processor's widest,
 * capped by KVRT_CPU_ISA. Read once; cheap after the first call. */
int kvrt_cpu_isa_level(void);

#endif /* KVRT_CPU_ISA_H */
