//! How a batch gets onto a training device, and what that costs: [`Traffic`] counts the bytes, and an
//! [`Uploader`] copies batches through two alternating page-locked ("pinned") buffers on a CUDA device, so
//! the copy runs asynchronously — the host goes on to read and check the next batch while the device
//! computes — and the host never waits for a copy still reading the buffer it is about to fill (it
//! fills the other one). On other devices it copies directly.

use candle_core::{Device, Tensor};

/// Bytes moved between host and device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Host → device.
    pub to_device: u64,
    /// Device → host.
    pub to_host: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Self) {
        self.to_device += o.to_device;
        self.to_host += o.to_host;
    }
}

fn batch_traffic(x: &[f32]) -> Traffic {
    Traffic {
        to_device: std::mem::size_of_val(x) as u64,
        to_host: 0,
    }
}

/// A batch `[n, d]` copied to `device` (synchronously, from pageable memory), with the bytes it moved: for
/// one-off copies. The training loop uses an [`Uploader`].
pub fn upload_batch(
    x: &[f32],
    d: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Traffic)> {
    Ok((
        Tensor::from_slice(x, (x.len() / d, d), device)?,
        batch_traffic(x),
    ))
}

/// Copies a training loop's batches to one device (see the module's documentation).
pub struct Uploader {
    device: Device,
    /// The two page-locked buffers, allocated at the first batch's size.
    #[cfg(feature = "cuda")]
    pinned: [Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>>; 2],
    /// Which buffer the next batch goes through.
    #[cfg(feature = "cuda")]
    next: usize,
}

impl Uploader {
    /// An uploader to `device` (allocates nothing until the first batch).
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            #[cfg(feature = "cuda")]
            pinned: [None, None],
            #[cfg(feature = "cuda")]
            next: 0,
        }
    }

    /// The device batches go to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Copies the batch `x` `[n, d]` to the device; on CUDA the copy may still be running when this returns
    /// (work queued after it on the device waits for it).
    pub fn upload(&mut self, x: &[f32], d: usize) -> candle_core::Result<(Tensor, Traffic)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            let dev = dev.clone();
            return Ok((self.upload_pinned(&dev, x, d)?, batch_traffic(x)));
        }
        upload_batch(x, d, &self.device)
    }

    #[cfg(feature = "cuda")]
    fn upload_pinned(
        &mut self,
        dev: &candle_core::CudaDevice,
        x: &[f32],
        d: usize,
    ) -> candle_core::Result<Tensor> {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::op::BackpropOp;
        use candle_core::{CudaStorage, Storage};

        let slot = &mut self.pinned[self.next];
        self.next = 1 - self.next;
        let stream = dev.cuda_stream();
        if slot.as_ref().is_none_or(|p| p.len() != x.len()) {
            // SAFETY: the buffer is written in full below before any copy reads it.
            *slot = Some(unsafe { stream.context().alloc_pinned::<f32>(x.len()) }.w()?);
        }
        let pinned = slot.as_mut().expect("allocated above");
        // Waits for the copy that last read this buffer (two batches ago) before overwriting it.
        pinned.as_mut_slice().w()?.copy_from_slice(x);
        // SAFETY: the copy below writes every element before any kernel queued after it reads one.
        let mut on_device = unsafe { dev.alloc::<f32>(x.len())? };
        stream.memcpy_htod(pinned, &mut on_device).w()?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(on_device, dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            (x.len() / d, d),
            BackpropOp::none(),
            false,
        ))
    }
}
