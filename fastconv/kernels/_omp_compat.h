/* OpenMP shims for the Cython kernels (after scikit-image's conditional_omp.h).
 *
 * setup.py compiles the extensions with -fopenmp when the compiler supports it; the
 * compiler then defines _OPENMP. Without it the same kernels build and run serially,
 * and these functions report one thread. The .pyx files call only these, never omp_*.
 */
#ifndef FASTCONV_OMP_COMPAT_H
#define FASTCONV_OMP_COMPAT_H

#if defined(_MSC_VER) && !defined(__cplusplus)
#define FC_INLINE __inline
#else
#define FC_INLINE inline
#endif

#ifdef _OPENMP
#include <omp.h>

static FC_INLINE int fc_openmp_enabled(void) { return 1; }
static FC_INLINE void fc_omp_set_num_threads(int n) { omp_set_num_threads(n); }
static FC_INLINE int fc_omp_get_max_threads(void) { return omp_get_max_threads(); }

#else

static FC_INLINE int fc_openmp_enabled(void) { return 0; }
static FC_INLINE void fc_omp_set_num_threads(int n) { (void)n; }
static FC_INLINE int fc_omp_get_max_threads(void) { return 1; }

#endif /* _OPENMP */

#endif /* FASTCONV_OMP_COMPAT_H */
