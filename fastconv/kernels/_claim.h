/* The one piece of C the Cython kernels share: claiming work items from a counter that several
 * threads of fastconv's pool advance at once (see fastconv/_threads.py). */
#ifndef FASTCONV_CLAIM_H
#define FASTCONV_CLAIM_H

#include <stdint.h>

#if defined(_MSC_VER)
#include <intrin.h>
static __inline int64_t fc_claim(int64_t *counter)
{
    return _InterlockedExchangeAdd64((volatile __int64 *)counter, 1);
}
#else
static inline int64_t fc_claim(int64_t *counter)
{
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}
#endif

#endif /* FASTCONV_CLAIM_H */
