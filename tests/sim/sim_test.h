/*
 * sim_test.h: what the sim's own tests (test_sim_errors.cpp,
 * test_sim_race.cpp) share: a failing check counted and printed, and the
 * message of the next synchronization.
 */
#ifndef KVRT_SIM_TEST_H
#define KVRT_SIM_TEST_H

#include "gpu_compat.h"

#include <stdio.h>
#include <string.h>

#include <string>

static int failures;

#define EXPECT_TRUE(cond, ...)                                                               \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            failures++;                                                                      \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fprintf(stderr, "\n");                                                           \
        }                                                                                    \
    } while (0)

static inline bool contains(const std::string &s, const char *what)
{
    return s.find(what) != std::string::npos;
}

/* The error of the device's next synchronization, its message in msg. */
static inline cudaError_t sync_message(std::string *msg)
{
    cudaError_t e = cudaDeviceSynchronize();
    *msg = cudaGetErrorString(e);
    return e;
}

#endif
