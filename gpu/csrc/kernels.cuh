// Fused decode-step kernels for blyan-gpu, compiled at run time with NVRTC
// (see graph_shim.cpp). bf16 values are handled as raw 16-bit words so that
// no CUDA header is needed; rounding is round-to-nearest-even, as torch's.
R"BLYAN(
typedef unsigned short bf16;
typedef long long i64;

__device__ __forceinline__ float ld(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ bf16 st(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}
__device__ __forceinline__ float rnd(float f) { return ld(st(f)); }
// bf16 quiet NaN: what a kernel writes to its output for an impossible
// position (KERN-2), so the fault shows in the step's output.
#define BLYAN_BF16_NAN ((bf16)0x7fc0)

// Bounds (KERN-1, KERN-2; gpu/src/sys.rs checks shapes and launch sizes on
// the host): every kernel first checks the launch geometry it relies on and
// returns without a write if it does not hold; `pos` is read on the device
// (the host cannot check it without a sync, and a CUDA graph replays it), so
// a position outside 0..max_len never indexes a cache: the kernel writes NaN
// to its output instead and leaves the caches untouched. Every early return
// is uniform over a block (it depends on the block's slot only), so no
// thread is left waiting at a barrier.

// One block per (slot, head) over q, k and v heads; hd/2 threads, thread t
// owns elements t and t + hd/2 (the pair that rotate_half mixes).
// q, k heads: RMSNorm over the head (f32, rounded to bf16), times the norm
// weight (q's pre-scaled by 1/sqrt(hd)), RoPE at the slot's position. q is
// written to q_out [B, nh, hd]; k and v to the caches [B, nkv, max_len, hd]
// at the slot's position.
extern "C" __global__ void qk_norm_rope_kv(
    const bf16* __restrict__ qkv, const bf16* __restrict__ w, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, const i64* __restrict__ pos, bf16* __restrict__ k_cache,
    bf16* __restrict__ v_cache, bf16* __restrict__ q_out, int nh, int nkv, int hd, int max_len,
    float eps) {
  const int b = blockIdx.x, head = blockIdx.y, t = threadIdx.x, half = hd / 2;
  const int heads = nh + 2 * nkv;
  if (nh < 1 || nkv < 1 || half < 1 || half > 1024 || (int)blockDim.x != half || head >= heads) {
    return;
  }
  const bf16* x = qkv + ((i64)b * heads + head) * hd;
  const i64 p = pos[b];
  if (p < 0 || p >= max_len) {  // KERN-2: q is NaN, no cache row is written
    if (head < nh) {
      bf16* dst = q_out + ((i64)b * nh + head) * hd;
      dst[t] = BLYAN_BF16_NAN;
      dst[t + half] = BLYAN_BF16_NAN;
    }
    return;
  }
  if (head >= nh + nkv) {  // v: copy into the cache
    const int kv = head - nh - nkv;
    bf16* dst = v_cache + (((i64)b * nkv + kv) * max_len + p) * hd;
    dst[t] = x[t];
    dst[t + half] = x[t + half];
    return;
  }
  float x1 = ld(x[t]), x2 = ld(x[t + half]);
  // Block sum of squares through shared memory (any hd/2 <= 1024, no
  // partial-warp shuffles); every thread reads the hd/2 partials.
  __shared__ float part[1024];
  part[t] = x1 * x1 + x2 * x2;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < half; ++i) total += part[i];
  const float rstd = rsqrtf(total / (float)hd + eps);
  const bf16* wh = w + (i64)head * hd;
  const float y1 = rnd(rnd(x1 * rstd) * ld(wh[t]));
  const float y2 = rnd(rnd(x2 * rstd) * ld(wh[t + half]));
  const float c = cos_t[p * half + t], s = sin_t[p * half + t];
  const bf16 o1 = st(rnd(y1 * c) - rnd(y2 * s));
  const bf16 o2 = st(rnd(y2 * c) + rnd(y1 * s));
  bf16* dst;
  if (head < nh) {
    dst = q_out + ((i64)b * nh + head) * hd;
  } else {
    dst = k_cache + (((i64)b * nkv + (head - nh)) * max_len + p) * hd;
  }
  dst[t] = o1;
  dst[t + half] = o2;
}

// act[b, i] = silu(gu[b, i]) * gu[b, inter + i], rounded as torch does
// (silu to bf16, then the product to bf16). Two elements per thread.
extern "C" __global__ void silu_mul(const bf16* __restrict__ gu, bf16* __restrict__ act, int inter,
                                    i64 n) {
  const i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x);
  if (inter < 1 || i >= n) return;
  const i64 b = i / inter, j = i - b * inter;
  const float g = ld(gu[b * 2 * inter + j]);
  const float u = ld(gu[b * 2 * inter + inter + j]);
  act[i] = st(rnd(g / (1.f + expf(-g))) * u);
}

// Decode attention, one block per (slot, q head), 1024 threads (so that the
// weighted sum over keys runs 1024 / hd keys in parallel per dimension). Attends over
// the visible keys only (0..=pos[b]), so the cost follows the sequence, not
// the cache. q is pre-scaled (the 1/sqrt(hd) is in the q-norm weights).
// Scores, softmax and the weighted sum in f32; out rounded once to bf16.
// Needs hd % 8 == 0, blockDim % hd == 0, and dynamic shared memory of
// (max_len + hd + 64 + blockDim) floats. Rows are 16-byte aligned (hd * 2 bytes).
extern "C" __global__ void decode_attn(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                       const bf16* __restrict__ v_cache, const i64* __restrict__ pos,
                                       bf16* __restrict__ out, int nh, int nkv, int hd, int max_len) {
  extern __shared__ float sm[];
  float* qs = sm;                 // [hd]
  float* red = sm + hd;                // [64]
  float* accs = sm + hd + 64;                // [blockDim]
  float* score = sm + hd + 64 + blockDim.x;  // [max_len]
  const float neg_inf = __int_as_float(0xff800000);
  const int b = blockIdx.x, h = blockIdx.y, t = threadIdx.x, nt = blockDim.x;
  if (hd < 8 || hd % 8 != 0 || nt % hd != 0 || nt % 32 != 0 || nt / 32 > 64 || nkv < 1 ||
      nh < nkv || nh % nkv != 0 || max_len < 1) {
    return;
  }
  const i64 p = pos[b];
  if (p < 0 || p >= max_len) {  // KERN-2: out is NaN, no key is read
    for (int d = t; d < hd; d += nt) out[((i64)b * nh + h) * hd + d] = BLYAN_BF16_NAN;
    return;
  }
  const int kvh = h / (nh / nkv);
  const int n = (int)p + 1;
  const bf16* qh = q + ((i64)b * nh + h) * hd;
  for (int d = t; d < hd; d += nt) qs[d] = ld(qh[d]);
  __syncthreads();
  const i64 base = ((i64)b * nkv + kvh) * (i64)max_len * hd;
  const bf16* kb = k_cache + base;
  const bf16* vb = v_cache + base;
  float local_max = neg_inf;
  for (int j = t; j < n; j += nt) {
    const uint4* row = (const uint4*)(kb + (i64)j * hd);
    float dot = 0.f;
    for (int c = 0; c < hd / 8; ++c) {
      const uint4 w = row[c];
      const unsigned parts[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dot += qs[c * 8 + 2 * e] * __uint_as_float(parts[e] << 16);
        dot += qs[c * 8 + 2 * e + 1] * __uint_as_float(parts[e] & 0xffff0000u);
      }
    }
    score[j] = dot;
    local_max = fmaxf(local_max, dot);
  }
  // Block max.
  for (int o = 16; o > 0; o >>= 1) local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, o));
  if ((t & 31) == 0) red[t >> 5] = local_max;
  __syncthreads();
  float m = neg_inf;
  for (int i = 0; i < nt / 32; ++i) m = fmaxf(m, red[i]);
  __syncthreads();
  float local_sum = 0.f;
  for (int j = t; j < n; j += nt) {
    const float p = expf(score[j] - m);
    score[j] = p;
    local_sum += p;
  }
  for (int o = 16; o > 0; o >>= 1) local_sum += __shfl_xor_sync(0xffffffffu, local_sum, o);
  if ((t & 31) == 0) red[t >> 5] = local_sum;
  __syncthreads();
  float sum = 0.f;
  for (int i = 0; i < nt / 32; ++i) sum += red[i];
  __syncthreads();
  // Weighted sum of v: groups of hd threads split the keys.
  const int groups = nt / hd, g = t / hd, d = t - g * hd;
  float acc = 0.f;
#pragma unroll 8
  for (int j = g; j < n; j += groups) acc += score[j] * ld(vb[(i64)j * hd + d]);
  accs[t] = acc;
  __syncthreads();
  if (g == 0) {
    float total = 0.f;
    for (int i = 0; i < groups; ++i) total += accs[i * hd + d];
    out[((i64)b * nh + h) * hd + d] = st(total / sum);
  }
}
)BLYAN"
