//! The crate's only `unsafe` code, kept here so it can be audited at once.
//!
//! Two things need it, and neither has a safe API in the crates we use:
//! - memory-mapping a weights file (`memmap2::Mmap::map` is `unsafe` because
//!   another process could truncate or rewrite the file while it is mapped;
//!   we map read-only files we own and copy out of them before returning);
//! - the CUDA-graph shim (`csrc/graph_shim.cpp`), reached through a small C
//!   ABI: tch has no CUDA-graph API, libtorch's `at::cuda::CUDAGraph` does.
//!
//! Every function here is safe to call, whatever its arguments (KERN-*
//! below): the shim catches C++ exceptions and reports them as an error code
//! plus message, and nothing a caller passes can make the code here or in the
//! kernels touch memory outside the tensors it was given.
//!
//! - **KERN-1** The wrappers of the fused kernels check every tensor's dtype,
//!   shape, contiguity and device (one CUDA device for all), every dimension
//!   (positive, within the C `int` the kernels take, within CUDA's grid
//!   limits) and every product the kernels index with (no overflow), before
//!   anything is launched ([`launch`], tested without a GPU). The kernels
//!   check the launch geometry they rely on again and write nothing if it
//!   does not hold.
//! - **KERN-2** Positions (`pos`) live on the device: the host cannot read
//!   them without a sync, and a captured CUDA graph replays them. So the
//!   kernels bound them: a position outside `0..max_len` never indexes a
//!   cache; the kernel writes NaN to its output instead (`csrc/kernels.cuh`).
//! - **KERN-3** A tensor viewing a memory map never leaves this crate's
//!   control: [`BlockTensor`] borrows the mapping, and every way to get a
//!   `Tensor` out of it copies.
#![allow(unsafe_code)]

use std::fs::File;
use std::marker::PhantomData;
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
        #[cfg(test)]
        pub fn blyan_kernels_compile_check(
            major: c_int,
            minor: c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
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
            device: c_int,
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
            device: c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn blyan_silu_mul(
            gu: *const c_void,
            act: *mut c_void,
            inter: c_int,
            n: i64,
            device: c_int,
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

    /// Replays the captured work on the current stream. It reads and writes
    /// the memory of the tensors the capture used: the graph's only owner,
    /// `engine::DecodeEngine`, holds them for as long as it holds the graph
    /// and never replaces one.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `self.ptr` is a live, captured graph; its tensors are alive
        // (above).
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

/// Launch checks of the fused kernels (KERN-1): plain arithmetic on the
/// dimensions, compiled with or without the shim so that every machine
/// tests them.
#[cfg_attr(not(blyan_cuda_graph), allow(dead_code))]
pub(crate) mod launch {
    use crate::error::{GpuError, Result};

    /// Largest cache length the attention kernel takes (its scores live in
    /// shared memory: `(max_len + hd + 1088) * 4` bytes, under 48 KiB).
    pub const ATTN_MAX_LEN: i64 = 10_000;
    /// Largest grid y dimension of a CUDA launch (the kernels put heads there).
    pub const GRID_Y_MAX: i64 = 65_535;
    /// Largest grid x dimension of a CUDA launch.
    pub const GRID_X_MAX: i64 = i32::MAX as i64;

    /// Checked dimensions of one launch, as the kernels take them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Dims {
        pub batch: i32,
        pub nh: i32,
        pub nkv: i32,
        pub hd: i32,
        pub max_len: i32,
        /// Rows of each cache: `batch * nkv * max_len`.
        pub cache_rows: i64,
    }

    fn invalid(what: String) -> GpuError {
        GpuError::Invalid(format!("fused kernel: {what}"))
    }

    /// `v` as the kernels' C `int`, which must be positive.
    fn int(name: &str, v: i64) -> Result<i32> {
        if v < 1 {
            return Err(invalid(format!("{name} = {v} must be positive")));
        }
        i32::try_from(v).map_err(|_| invalid(format!("{name} = {v} exceeds a C int")))
    }

    fn mul(a: i64, b: i64, what: &str) -> Result<i64> {
        a.checked_mul(b)
            .ok_or_else(|| invalid(format!("{what} ({a} × {b}) overflows")))
    }

    fn common(b: i64, nh: i64, nkv: i64, hd: i64, max_len: i64) -> Result<Dims> {
        let (batch, nh_i, nkv_i, hd_i, max_len_i) = (
            int("batch", b)?,
            int("nh", nh)?,
            int("nkv", nkv)?,
            int("head_dim", hd)?,
            int("max_len", max_len)?,
        );
        let cache_rows = mul(mul(b, nkv, "cache rows")?, max_len, "cache rows")?;
        // The kernels index the caches with i64 element offsets.
        mul(cache_rows, hd, "cache elements")?;
        Ok(Dims {
            batch,
            nh: nh_i,
            nkv: nkv_i,
            hd: hd_i,
            max_len: max_len_i,
            cache_rows,
        })
    }

    /// `qk_norm_rope_kv`: grid `(batch, nh + 2 nkv)`, `hd / 2` threads.
    pub fn qk(b: i64, nh: i64, nkv: i64, hd: i64, max_len: i64) -> Result<Dims> {
        let d = common(b, nh, nkv, hd, max_len)?;
        if hd % 2 != 0 || hd / 2 > 1024 {
            return Err(invalid(format!(
                "head_dim {hd} unsupported (even, at most 2048)"
            )));
        }
        // Both terms are C ints, so the sum cannot overflow an i64.
        let heads = nh + 2 * nkv;
        if heads > GRID_Y_MAX {
            return Err(invalid(format!(
                "{heads} heads exceed CUDA's grid ({GRID_Y_MAX})"
            )));
        }
        Ok(d)
    }

    /// Whether the attention kernel supports these dimensions.
    pub fn attn_supported(hd: i64, max_len: i64) -> bool {
        hd % 8 == 0 && hd > 0 && 1024 % hd == 0 && (1..=ATTN_MAX_LEN).contains(&max_len)
    }

    /// `decode_attn`: grid `(batch, nh)`, 1024 threads.
    pub fn attn(b: i64, nh: i64, nkv: i64, hd: i64, max_len: i64) -> Result<Dims> {
        let d = common(b, nh, nkv, hd, max_len)?;
        if !attn_supported(hd, max_len) {
            return Err(invalid(format!(
                "decode_attn: head_dim {hd}, max_len {max_len} unsupported"
            )));
        }
        if nh % nkv != 0 {
            return Err(invalid(format!("nh {nh} is not a multiple of nkv {nkv}")));
        }
        if nh > GRID_Y_MAX {
            return Err(invalid(format!(
                "{nh} heads exceed CUDA's grid ({GRID_Y_MAX})"
            )));
        }
        Ok(d)
    }

    /// `silu_mul` over `gu` `[b, two_inter]`: `(inter, n = b * inter)`;
    /// grid `ceil(n / 256)` blocks of 256 threads.
    pub fn silu(b: i64, two_inter: i64) -> Result<(i32, i64)> {
        int("batch", b)?;
        if two_inter % 2 != 0 {
            return Err(invalid(format!("gate/up width {two_inter} is odd")));
        }
        let inter = int("inter", two_inter / 2)?;
        let n = mul(b, i64::from(inter), "elements")?;
        // n is positive, so (n + 255) / 256 is its ceiling without overflow.
        if (n - 1) / 256 + 1 > GRID_X_MAX {
            return Err(invalid(format!("{n} elements exceed CUDA's grid")));
        }
        Ok((inter, n))
    }
}

/// The fused decode kernels (`csrc/kernels.cuh`), compiled with NVRTC for
/// the current device on first use. Safe for any arguments (KERN-1, KERN-2).
#[cfg(blyan_cuda_graph)]
pub mod kernels {
    use tch::{Kind, Tensor};

    use super::launch;
    use super::{check, ffi};
    use crate::error::{GpuError, Result};

    pub use super::launch::attn_supported;

    /// Compiles the kernels (idempotent).
    pub fn init() -> Result<()> {
        // SAFETY: writes at most `len` bytes into the buffer.
        check(|e, l| unsafe { ffi::blyan_kernels_init(e, l) })
    }

    /// Compiles the kernel source with NVRTC for compute capability
    /// `major.minor` and drops the result (needs no device).
    #[cfg(test)]
    pub fn compile_check(major: i32, minor: i32) -> Result<()> {
        // SAFETY: writes at most `len` bytes into the buffer.
        check(|e, l| unsafe { ffi::blyan_kernels_compile_check(major, minor, e, l) })
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

    /// The one CUDA device every tensor is on (the launch runs there).
    fn one_device(tensors: &[&Tensor]) -> Result<i32> {
        let first = tensors.first().map(|t| t.device());
        match first {
            Some(tch::Device::Cuda(i))
                if tensors.iter().all(|t| t.device() == tch::Device::Cuda(i)) =>
            {
                i32::try_from(i).map_err(|_| GpuError::Invalid(format!("CUDA device {i}")))
            }
            _ => Err(GpuError::Invalid(format!(
                "fused kernel arguments on {:?}: all must be on one CUDA device",
                tensors.iter().map(|t| t.device()).collect::<Vec<_>>()
            ))),
        }
    }

    /// The batch: `pos`'s length (`pos` must be one-dimensional).
    fn batch(pos: &Tensor) -> Result<i64> {
        match pos.size().as_slice() {
            [b] => Ok(*b),
            other => Err(GpuError::Invalid(format!(
                "fused kernel argument pos: shape {other:?}, expected [batch]"
            ))),
        }
    }

    /// q/k RMSNorm (weights `w`: `[nh + nkv, hd]`), RoPE (`cos`/`sin`:
    /// `[max_len, hd/2]` f32) at `pos` (`[b]` i64), k and v written into the
    /// caches (`[b * nkv * max_len, hd]`) at `pos`, q into `q_out`
    /// (`[b, nh, hd]`). Every shape and dimension is checked here (KERN-1);
    /// a position outside `0..max_len` writes no cache row and makes that
    /// slot's q NaN (KERN-2).
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
        let b = batch(pos)?;
        let d = launch::qk(b, nh, nkv, hd, max_len)?;
        want(qkv, "qkv", Kind::BFloat16, &[b, (nh + 2 * nkv) * hd])?;
        want(w, "w", Kind::BFloat16, &[nh + nkv, hd])?;
        want(cos, "cos", Kind::Float, &[max_len, hd / 2])?;
        want(sin, "sin", Kind::Float, &[max_len, hd / 2])?;
        want(pos, "pos", Kind::Int64, &[b])?;
        want(k_cache, "k_cache", Kind::BFloat16, &[d.cache_rows, hd])?;
        want(v_cache, "v_cache", Kind::BFloat16, &[d.cache_rows, hd])?;
        want(q_out, "q_out", Kind::BFloat16, &[b, nh, hd])?;
        let device = one_device(&[qkv, w, cos, sin, pos, k_cache, v_cache, q_out])?;
        // SAFETY: every pointer is a live, contiguous CUDA tensor on
        // `device` of the shape checked above for the checked dimensions;
        // the kernel indexes within those shapes for any value of `pos`
        // (KERN-2).
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
                d.batch,
                d.nh,
                d.nkv,
                d.hd,
                d.max_len,
                eps as f32,
                device,
                e,
                l,
            )
        })
    }

    /// Decode attention over keys `0..=pos[b]` of the caches
    /// (`[b * nkv * max_len, hd]`) for q `[b, nh, hd]` into `out`
    /// (`[b, nh, hd]`). Checked as `qk_norm_rope_kv` is; a position outside
    /// `0..max_len` reads no key and makes that slot's output NaN.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attn(
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        pos: &Tensor,
        out: &Tensor,
        (nh, nkv, hd, max_len): (i64, i64, i64, i64),
    ) -> Result<()> {
        let b = batch(pos)?;
        let d = launch::attn(b, nh, nkv, hd, max_len)?;
        want(q, "q", Kind::BFloat16, &[b, nh, hd])?;
        want(k_cache, "k_cache", Kind::BFloat16, &[d.cache_rows, hd])?;
        want(v_cache, "v_cache", Kind::BFloat16, &[d.cache_rows, hd])?;
        want(pos, "pos", Kind::Int64, &[b])?;
        want(out, "out", Kind::BFloat16, &[b, nh, hd])?;
        let device = one_device(&[q, k_cache, v_cache, pos, out])?;
        // SAFETY: live, contiguous CUDA tensors on `device` of the checked
        // shapes; keys read are 0..=pos[b], and the kernel reads none when
        // pos[b] is outside 0..max_len (KERN-2).
        check(|e, l| unsafe {
            ffi::blyan_decode_attn(
                q.data_ptr(),
                k_cache.data_ptr(),
                v_cache.data_ptr(),
                pos.data_ptr(),
                out.data_ptr(),
                d.batch,
                d.nh,
                d.nkv,
                d.hd,
                d.max_len,
                device,
                e,
                l,
            )
        })
    }

    /// `act = silu(gu[:, :inter]) * gu[:, inter:]`, `gu`: `[b, 2 inter]`.
    pub fn silu_mul(gu: &Tensor, act: &Tensor) -> Result<()> {
        let (b, two_inter) = gu.size2()?;
        let (inter, n) = launch::silu(b, two_inter)?;
        want(gu, "gu", Kind::BFloat16, &[b, two_inter])?;
        want(act, "act", Kind::BFloat16, &[b, i64::from(inter)])?;
        let device = one_device(&[gu, act])?;
        // SAFETY: both tensors are live, contiguous, on `device`, of the
        // checked shapes; the kernel touches elements below `n` only.
        check(|e, l| unsafe {
            ffi::blyan_silu_mul(gu.data_ptr(), act.data_ptr(), inter, n, device, e, l)
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

/// A tensor of a loaded block that views its memory-mapped file (KERN-3).
///
/// It borrows the mapping (`'map`), so it cannot outlive it, and no `Tensor`
/// that shares its memory ever leaves it: [`BlockTensor::copy`] and
/// [`BlockTensor::to_device`] always copy, on the CPU too (tch's `to_device`,
/// `to_kind`, `shallow_clone` and views return tensors that share storage,
/// through which a view of the mapping would outlive it). It is never
/// written through (the mapping is read-only).
pub struct BlockTensor<'map> {
    view: tch::Tensor,
    _map: PhantomData<&'map [u8]>,
}

impl<'map> BlockTensor<'map> {
    /// Views `data` as a `kind` tensor of `shape` without copying it (falls
    /// back to a copy if the bytes are not aligned for `kind`).
    pub(crate) fn new(data: &'map [u8], shape: &[i64], kind: tch::Kind) -> Result<Self> {
        let elt = kind.elt_size_in_bytes();
        let numel = shape
            .iter()
            .try_fold(
                1i64,
                |acc, &d| if d < 0 { None } else { acc.checked_mul(d) },
            )
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| n.checked_mul(elt));
        if numel != Some(data.len()) {
            return Err(GpuError::Invalid(format!(
                "{} bytes for shape {shape:?} of {kind:?}",
                data.len()
            )));
        }
        if !(data.as_ptr() as usize).is_multiple_of(elt) || data.is_empty() {
            let view = tch::Tensor::f_from_data_size(data, shape, kind)?;
            return Ok(BlockTensor {
                view,
                _map: PhantomData,
            });
        }
        let mut strides = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        // SAFETY: `data` holds exactly the shape's elements of `kind`,
        // aligned; the view is dropped with `self`, which cannot outlive
        // `'map`, and no tensor sharing its memory leaves `self` (KERN-3).
        let view = unsafe {
            tch::Tensor::f_from_blob(data.as_ptr(), shape, &strides, kind, tch::Device::Cpu)?
        };
        Ok(BlockTensor {
            view,
            _map: PhantomData,
        })
    }

    /// The tensor's shape.
    pub fn size(&self) -> Vec<i64> {
        self.view.size()
    }

    /// The tensor's element kind.
    pub fn kind(&self) -> tch::Kind {
        self.view.kind()
    }

    /// A copy in fresh CPU memory.
    pub fn copy(&self) -> tch::Tensor {
        self.to_device(tch::Device::Cpu)
    }

    /// A copy on `device` (in fresh memory on the CPU too).
    pub fn to_device(&self, device: tch::Device) -> tch::Tensor {
        self.view.to_device_(device, self.view.kind(), false, true)
    }
}

#[cfg(test)]
mod tests {
    use super::launch;

    #[test]
    fn launch_checks_accept_the_engine_dimensions() {
        // Qwen3-0.6B: 16 q heads, 8 kv heads, head_dim 128.
        let d = launch::qk(4, 16, 8, 128, 4096).expect("qk");
        assert_eq!(
            (d.batch, d.nh, d.nkv, d.hd, d.max_len),
            (4, 16, 8, 128, 4096)
        );
        assert_eq!(d.cache_rows, 4 * 8 * 4096);
        assert_eq!(launch::attn(4, 16, 8, 128, 4096).expect("attn"), d);
        assert_eq!(launch::silu(4, 2 * 3072).expect("silu"), (3072, 4 * 3072));
    }

    /// KERN-1: no dimension reaches a kernel unchecked: zero or negative
    /// counts, values past a C int, products that overflow, grids past
    /// CUDA's limits and head layouts the kernels cannot index.
    #[test]
    fn launch_checks_refuse_what_the_kernels_cannot_index() {
        let big = i64::from(i32::MAX) + 1;
        for (b, nh, nkv, hd, max_len) in [
            (0, 16, 8, 128, 64),
            (1, 0, 8, 128, 64),
            (1, 16, 0, 128, 64),
            (1, 16, 8, 0, 64),
            (1, 16, 8, 128, 0),
            (-1, 16, 8, 128, 64),
            (big, 16, 8, 128, 64),
            (1, big, 8, 128, 64),
            (1, 16, 8, 128, big),
            (1, 16, 8, 127, 64),
            (1, 16, 8, 4096, 64),
            (1, 65_530, 8, 128, 64),
            (
                i64::from(i32::MAX),
                16,
                i64::from(i32::MAX),
                128,
                i64::from(i32::MAX),
            ),
        ] {
            assert!(
                launch::qk(b, nh, nkv, hd, max_len).is_err(),
                "qk {:?}",
                (b, nh, nkv, hd, max_len)
            );
        }
        for (b, nh, nkv, hd, max_len) in [
            (1, 16, 0, 128, 64),
            (1, 16, 3, 128, 64),
            (1, 4, 8, 128, 64),
            (1, 16, 8, 100, 64),
            (1, 16, 8, 128, launch::ATTN_MAX_LEN + 1),
            (1, 70_000, 1, 128, 64),
            (0, 16, 8, 128, 64),
        ] {
            assert!(
                launch::attn(b, nh, nkv, hd, max_len).is_err(),
                "attn {:?}",
                (b, nh, nkv, hd, max_len)
            );
        }
        for (b, two_inter) in [(0, 8), (1, 0), (1, 7), (1, 2 * big), (big, 8), (-3, 8)] {
            assert!(launch::silu(b, two_inter).is_err(), "silu {b} {two_inter}");
        }
    }

    /// The wrappers refuse bad dimensions with an error, before anything
    /// else: once by dividing by zero (`nh % nkv` with `nkv = 0`) and once
    /// by overflowing `(nh + 2 nkv) * hd`, they panicked. Runs on the CPU:
    /// the tensors never reach a kernel.
    #[cfg(blyan_cuda_graph)]
    #[test]
    fn kernel_wrappers_refuse_bad_dimensions_without_panicking() {
        use super::kernels;
        use tch::{Device, Kind, Tensor};
        let t = |shape: &[i64], kind| Tensor::zeros(shape, (kind, Device::Cpu));
        let pos = t(&[1], Kind::Int64);
        let x = t(&[1, 8], Kind::BFloat16);
        let err = kernels::decode_attn(&x, &x, &x, &pos, &x, (4, 0, 8, 16))
            .expect_err("nkv = 0 must be refused");
        assert!(err.to_string().contains("nkv"), "{err}");
        let huge = i64::MAX / 4;
        let err =
            kernels::qk_norm_rope_kv(&x, &x, &x, &x, &pos, &x, &x, &x, (huge, 1, 8, 16), 1e-6)
                .expect_err("nh past a C int must be refused");
        assert!(err.to_string().contains("nh"), "{err}");
        // Well-formed dimensions, but CPU tensors: refused too (KERN-1).
        let (nh, nkv, hd, max_len) = (2, 1, 8, 4);
        let q = t(&[1, nh, hd], Kind::BFloat16);
        let cache = t(&[nkv * max_len, hd], Kind::BFloat16);
        let err = kernels::decode_attn(&q, &cache, &cache, &pos, &q, (nh, nkv, hd, max_len))
            .expect_err("CPU tensors must be refused");
        assert!(err.to_string().contains("CUDA"), "{err}");
        let pos2 = t(&[1, 1], Kind::Int64);
        assert!(
            kernels::decode_attn(&q, &cache, &cache, &pos2, &q, (nh, nkv, hd, max_len)).is_err(),
            "a two-dimensional pos must be refused"
        );
        let gu = t(&[1, 7], Kind::BFloat16);
        assert!(kernels::silu_mul(&gu, &q).is_err(), "odd gate/up width");
    }

    /// The kernel source, with its bounds checks (KERN-1, KERN-2), compiles
    /// with NVRTC (no device needed: this is the one check of
    /// `csrc/kernels.cuh` a machine without a GPU can run).
    #[cfg(blyan_cuda_graph)]
    #[test]
    fn kernel_source_compiles_with_nvrtc() {
        super::kernels::compile_check(9, 0).expect("NVRTC compiles csrc/kernels.cuh");
    }
}
