/* pyro_inflow's compiled kernel: the fixed-grid RK4 solve of a learned pfODE and its adjoint,
 * with or without the exact log-determinant, in float32 and float64. Built at first use by
 * pyro_inflow/solvers/fused.py with the C compiler it finds (plain C11, no Python or torch
 * headers) and loaded with ctypes; without a compiler the package uses its PyTorch path,
 * which gives the same numbers. */
#include <stdint.h>
#include <stdlib.h>

#ifndef VBYTES
#define VBYTES 64
#endif
#define MAX_UNITS 64

int pyro_inflow_kernel_version(void) { return 4; }

#define REAL float
#define FN(name) name##_f32
#define IS_F32 1
#define INT_T int32_t
#define UINT_T uint32_t
#define EXP_BIAS 127
#define MANT_BITS 23
#define ROUNDER 12582912.0f
#include "_fused_body.h"
#undef REAL
#undef FN
#undef IS_F32
#undef INT_T
#undef UINT_T
#undef EXP_BIAS
#undef MANT_BITS
#undef ROUNDER

#define REAL double
#define FN(name) name##_f64
#define IS_F32 0
#define INT_T int64_t
#define UINT_T uint64_t
#define EXP_BIAS 1023
#define MANT_BITS 52
#define ROUNDER 6755399441055744.0
#include "_fused_body.h"
