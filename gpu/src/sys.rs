//! The crate's only `unsafe` code, kept here so it can be audited at once.
//!
//! Two things need it, and neither has a safe API in the crates we use:
//! - memory-mapping a weights file (`memmap2::Mmap::map` is `unsafe` because
//!   another process could truncate or rewrite the file while it is mapped;
//!   we map read-only files we own and copy out of them before returning);
//! - the CUDA-graph shim (`csrc/graph_shim.cpp`), reached through a small C
//!   ABI: tch has no CUDA-graph API, libtorch's `at::cuda::CUDAGraph` does.
//!
//! Every function here is safe to call: the shim catches C++ exceptions and
//! reports them as an error code plus message.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use crate::error::{GpuError, Result};

/// Maps a file read-only.
pub(crate) fn mmap_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| GpuError::io(path, e))?;
    // SAFETY: the mapping is read-only and the engine never writes to weight
    // files; a concurrent external truncation is the documented risk of mmap
    // and is outside what this program controls.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| GpuError::io(path, e))?;
    Ok(map)
}

/// Whether the CUDA-graph shim was compiled in (it needs the CUDA headers
/// shipped in PyPI's torch wheel at build time).
pub const CUDA_GRAPH_AVAILABLE: bool = cfg!(blyan_cuda_graph);

#[cfg(blyan_cuda_graph)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    unsafe extern "C" {
        pub fn blyan_graph_new() -> *mut c_void;
        pub fn blyan_graph_free(g: *mut c_void);
        pub fn blyan_side_stream_enter(err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_side_stream_exit(err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_graph_capture_begin(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_graph_capture_end(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_graph_replay(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_cuda_synchronize(err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_set_blas_backend(which: c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_kernels_init(err: *mut c_char, len: usize) -> c_int;
        pub fn blyan_qk_norm_rope_kv(
            qkv: *const c_void,
            w: *const c_void,
            cos_t: *const c_void,
            sin_t: *const c_void,
            pos: *const c_void,
            k_cache: *mut c_void,
            v_cache: *mut c_void,
            q_out: *mut c_void,
            batch: c_int,
            nh: c_int,
            nkv: c_int,
            hd: c_int,
            max_len: c_int,
            eps: f32,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn blyan_decode_attn(
            q: *const c_void,
            k_cache: *const c_void,
            v_cache: *const c_void,
            pos: *const c_void,
            out: *mut c_void,
            batch: c_int,
            nh: c_int,
            nkv: c_int,
            hd: c_int,
            max_len: c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn blyan_silu_mul(
            gu: *const c_void,
            act: *mut c_void,
            inter: c_int,
            n: i64,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
    }
}

#[cfg(blyan_cuda_graph)]
fn check(f: impl FnOnce(*mut std::os::raw::c_char, usize) -> std::os::raw::c_int) -> Result<()> {
    let mut buf = [0u8; 512];
    let rc = f(buf.as_mut_ptr().cast(), buf.len());
    if rc == 0 {
        return Ok(());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Err(GpuError::Graph(
        String::from_utf8_lossy(&buf[..end]).into_owned(),
    ))
}

/// A captured CUDA graph (`at::cuda::CUDAGraph`).
#[cfg(blyan_cuda_graph)]
pub struct CudaGraph {
    ptr: *mut std::os::raw::c_void,
}

#[cfg(blyan_cuda_graph)]
impl CudaGraph {
    /// A new, empty graph.
    pub fn new() -> Result<Self> {
        // SAFETY: returns a fresh heap object or null.
        let ptr = unsafe { ffi::blyan_graph_new() };
        if ptr.is_null() {
            return Err(GpuError::Graph("cannot allocate a CUDA graph".into()));
        }
        Ok(CudaGraph { ptr })
    }

    /// Makes a side stream from libtorch's pool the current stream (capture
    /// must not happen on the default stream); warm up on it before capture.
    pub fn enter_side_stream() -> Result<()> {
        // SAFETY: writes at most `len` bytes into the buffer.
        check(|e, l| unsafe { ffi::blyan_side_stream_enter(e, l) })
    }

    /// Restores the stream that was current before `enter_side_stream`.
    pub fn exit_side_stream() -> Result<()> {
        // SAFETY: as above.
        check(|e, l| unsafe { ffi::blyan_side_stream_exit(e, l) })
    }

    /// Starts capturing the work queued on the current stream.
    pub fn capture_begin(&mut self) -> Result<()> {
        // SAFETY: `self.ptr` is a live graph.
        check(|e, l| unsafe { ffi::blyan_graph_capture_begin(self.ptr, e, l) })
    }

    /// Ends the capture.
    pub fn capture_end(&mut self) -> Result<()> {
        // SAFETY: `self.ptr` is a live graph.
        check(|e, l| unsafe { ffi::blyan_graph_capture_end(self.ptr, e, l) })
    }

    /// Replays the captured work on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `self.ptr` is a live, captured graph.
        check(|e, l| unsafe { ffi::blyan_graph_replay(self.ptr, e, l) })
    }
}

#[cfg(blyan_cuda_graph)]
impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from `blyan_graph_new` and is freed once.
        unsafe { ffi::blyan_graph_free(self.ptr) }
    }
}

/// Chooses libtorch's BLAS library for CUDA matmuls: `None` for its
/// default, `Some(false)` cuBLAS, `Some(true)` cuBLASLt (benchmarks).
pub fn set_blas_backend(cublaslt: Option<bool>) -> Result<()> {
    #[cfg(blyan_cuda_graph)]
    {
        let which = match cublaslt {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        // SAFETY: writes at most `len` bytes into the buffer.
        check(|e, l| unsafe { ffi::blyan_set_blas_backend(which, e, l) })
    }
    #[cfg(not(blyan_cuda_graph))]
    {
        let _ = cublaslt;
        Err(GpuError::Graph("built without the CUDA shim".into()))
    }
}

/// The fused decode kernels (`csrc/kernels.cuh`), compiled with NVRTC for
/// the current device on first use.
#[cfg(blyan_cuda_graph)]
pub mod kernels {
    use tch::{Kind, Tensor};

    use super::{check, ffi};
    use crate::error::{GpuError, Result};

    /// Compiles the kernels (idempotent).
    pub fn init() -> Result<()> {
        // SAFETY: writes at most `len` bytes into the buffer.
        check(|e, l| unsafe { ffi::blyan_kernels_init(e, l) })
    }

    fn want(t: &Tensor, what: &str, kind: Kind, shape: &[i64]) -> Result<()> {
        let ok = t.kind() == kind
            && t.is_contiguous()
            && t.size() == shape
            && matches!(t.device(), tch::Device::Cuda(_));
        if ok {
            Ok(())
        } else {
            Err(GpuError::Invalid(format!(
                "fused kernel argument {what}: {:?} {:?} on {:?}, expected contiguous CUDA {kind:?} {shape:?}",
                t.kind(),
                t.size(),
                t.device()
            )))
        }
    }

    /// q/k RMSNorm (weights `w`: `[nh + nkv, hd]`), RoPE (`cos`/`sin`:
    /// `[max_len, hd/2]` f32) at `pos` (`[b]` i64), k and v written into the
    /// caches (`[b * nkv * max_len, hd]`) at `pos`, q into `q_out`
    /// (`[b, nh, hd]`). Every shape is checked here; the caller guarantees
    /// that every value of `pos` is below `max_len` (the engine's host
    /// mirror of the positions enforces it).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope_kv(
        qkv: &Tensor,
        w: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pos: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        q_out: &Tensor,
        (nh, nkv, hd, max_len): (i64, i64, i64, i64),
        eps: f64,
    ) -> Result<()> {
        let b = pos.size().first().copied().unwrap_or(0);
        if hd % 2 != 0 || hd / 2 > 1024 {
            return Err(GpuError::Invalid(format!(
                "head_dim {hd} unsupported by the fused kernel"
            )));
        }
        want(qkv, "qkv", Kind::BFloat16, &[b, (nh + 2 * nkv) * hd])?;
        want(w, "w", Kind::BFloat16, &[nh + nkv, hd])?;
        want(cos, "cos", Kind::Float, &[max_len, hd / 2])?;
        want(sin, "sin", Kind::Float, &[max_len, hd / 2])?;
        want(pos, "pos", Kind::Int64, &[b])?;
        want(k_cache, "k_cache", Kind::BFloat16, &[b * nkv * max_len, hd])?;
        want(v_cache, "v_cache", Kind::BFloat16, &[b * nkv * max_len, hd])?;
        want(q_out, "q_out", Kind::BFloat16, &[b, nh, hd])?;
        let int =
            |v: i64| i32::try_from(v).map_err(|_| GpuError::Invalid(format!("{v} too large")));
        let (bi, nhi, nkvi, hdi, mli) = (int(b)?, int(nh)?, int(nkv)?, int(hd)?, int(max_len)?);
        // SAFETY: every pointer is a live CUDA tensor of the checked shape;
        // the kernel indexes within those shapes given pos < max_len.
        check(|e, l| unsafe {
            ffi::blyan_qk_norm_rope_kv(
                qkv.data_ptr(),
                w.data_ptr(),
                cos.data_ptr(),
                sin.data_ptr(),
                pos.data_ptr(),
                k_cache.data_ptr(),
                v_cache.data_ptr(),
                q_out.data_ptr(),
                bi,
                nhi,
                nkvi,
                hdi,
                mli,
                eps as f32,
                e,
                l,
            )
        })
    }

    /// Largest cache length the attention kernel takes (its scores live in
    /// shared memory: `(max_len + hd + 1088) * 4` bytes, under 48 KiB).
    pub const ATTN_MAX_LEN: i64 = 10_000;

    /// Whether `decode_attn` supports these dimensions.
    pub fn attn_supported(hd: i64, max_len: i64) -> bool {
        hd % 8 == 0 && hd > 0 && 1024 % hd == 0 && (1..=ATTN_MAX_LEN).contains(&max_len)
    }

    /// Decode attention over keys `0..=pos[b]` of the caches
    /// (`[b * nkv * max_len, hd]`) for q `[b, nh, hd]` into `out`
    /// (`[b, nh, hd]`). Same contract on `pos` as `qk_norm_rope_kv`.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attn(
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        pos: &Tensor,
        out: &Tensor,
        (nh, nkv, hd, max_len): (i64, i64, i64, i64),
    ) -> Result<()> {
        let b = pos.size().first().copied().unwrap_or(0);
        if !attn_supported(hd, max_len) || nh % nkv != 0 {
            return Err(GpuError::Invalid(format!(
                "decode_attn: head_dim {hd}, max_len {max_len} unsupported"
            )));
        }
        want(q, "q", Kind::BFloat16, &[b, nh, hd])?;
        want(k_cache, "k_cache", Kind::BFloat16, &[b * nkv * max_len, hd])?;
        want(v_cache, "v_cache", Kind::BFloat16, &[b * nkv * max_len, hd])?;
        want(pos, "pos", Kind::Int64, &[b])?;
        want(out, "out", Kind::BFloat16, &[b, nh, hd])?;
        let int =
            |v: i64| i32::try_from(v).map_err(|_| GpuError::Invalid(format!("{v} too large")));
        let (bi, nhi, nkvi, hdi, mli) = (int(b)?, int(nh)?, int(nkv)?, int(hd)?, int(max_len)?);
        // SAFETY: live CUDA tensors of the checked shapes; keys read are
        // 0..=pos[b] < max_len.
        check(|e, l| unsafe {
            ffi::blyan_decode_attn(
                q.data_ptr(),
                k_cache.data_ptr(),
                v_cache.data_ptr(),
                pos.data_ptr(),
                out.data_ptr(),
                bi,
                nhi,
                nkvi,
                hdi,
                mli,
                e,
                l,
            )
        })
    }

    /// `act = silu(gu[:, :inter]) * gu[:, inter:]`, `gu`: `[b, 2 inter]`.
    pub fn silu_mul(gu: &Tensor, act: &Tensor) -> Result<()> {
        let (b, two_inter) = gu.size2()?;
        let inter = two_inter / 2;
        want(gu, "gu", Kind::BFloat16, &[b, 2 * inter])?;
        want(act, "act", Kind::BFloat16, &[b, inter])?;
        let inter_i =
            i32::try_from(inter).map_err(|_| GpuError::Invalid("inter too large".into()))?;
        // SAFETY: both tensors are live, contiguous, of the checked shapes.
        check(|e, l| unsafe {
            ffi::blyan_silu_mul(gu.data_ptr(), act.data_ptr(), inter_i, b * inter, e, l)
        })
    }
}

/// Waits for all queued CUDA work (no-op without the shim).
pub fn cuda_synchronize() -> Result<()> {
    #[cfg(blyan_cuda_graph)]
    {
        // SAFETY: writes at most `len` bytes into the buffer.
        check(|e, l| unsafe { ffi::blyan_cuda_synchronize(e, l) })
    }
    #[cfg(not(blyan_cuda_graph))]
    {
        Ok(())
    }
}

/// A tensor viewing `data` without copying it (falls back to a copy if the
/// bytes are not aligned for `kind`).
///
/// The view borrows `data` without a lifetime: callers (only
/// `blocks::BlockStore::with_block_tensors`) must drop it before `data`,
/// and must not write through it (the mapping is read-only).
pub(crate) fn tensor_view(data: &[u8], shape: &[i64], kind: tch::Kind) -> Result<tch::Tensor> {
    let elt = kind.elt_size_in_bytes();
    let numel: i64 = shape.iter().product();
    if data.len() != numel as usize * elt {
        return Err(GpuError::Invalid(format!(
            "{} bytes for {numel} elements of {kind:?}",
            data.len()
        )));
    }
    if !(data.as_ptr() as usize).is_multiple_of(elt) || data.is_empty() {
        return Ok(tch::Tensor::f_from_data_size(data, shape, kind)?);
    }
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: `data` holds exactly `numel` aligned elements of `kind` and
    // outlives the view by the caller's contract above.
    let t = unsafe {
        tch::Tensor::f_from_blob(data.as_ptr(), shape, &strides, kind, tch::Device::Cpu)?
    };
    Ok(t)
}
