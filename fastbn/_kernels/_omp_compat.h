/* OpenMP when the build has it, a single-thread stand-in when it doesn't. */
#ifndef FASTBN_OMP_COMPAT_H
#define FASTBN_OMP_COMPAT_H
#ifdef _OPENMP
#include <omp.h>
#define FASTBN_OPENMP 1
#else
#define FASTBN_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#endif
