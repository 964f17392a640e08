//! A global allocator that asks Linux for transparent huge pages under big buffers.
//!
//! The SAE step reads and writes rows of its ~10–75 MB buffers (token rows of the batch, the error, latent
//! rows of the weights and their gradients) in an order no prefetcher follows; with 4 KiB pages most of
//! those reads also miss the TLB. Where the kernel's THP mode is `madvise` (a common default), only regions
//! marked `MADV_HUGEPAGE` get 2 MiB pages, and glibc's `malloc` marks nothing unless the
//! `glibc.malloc.hugetlb` tunable is set before the process starts. [`HugePages`] wraps the system allocator
//! and marks every allocation of [`MIN_BYTES`] or more, before its pages are first touched. It changes where
//! memory sits, never what is computed. Elsewhere than Linux it is the system allocator.
//!
//! Use it from a binary: `#[global_allocator] static ALLOC: HugePages = HugePages;`.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations at least this big are marked for huge pages (smaller ones gain little and would round up).
pub const MIN_BYTES: usize = 4 << 20;

/// The size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// The system allocator, with allocations of [`MIN_BYTES`] or more marked `MADV_HUGEPAGE` (Linux).
pub struct HugePages;

// SAFETY: every call is forwarded to `System` unchanged; `advise` only marks the pages of the block just
// returned, which does not move or change its contents.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let block = unsafe { System.alloc(layout) };
        advise(block, layout.size());
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let block = unsafe { System.alloc_zeroed(layout) };
        advise(block, layout.size());
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let block = unsafe { System.realloc(block, layout, new_size) };
        advise(block, new_size);
        block
    }
}

/// Lets glibc keep the big blocks a process frees, for its next allocations to reuse. By default a block
/// of more than 128 KiB–32 MiB (the threshold follows the largest one freed) is a fresh `mmap` and goes back
/// to the kernel when freed, and the heap's top is returned past `2 × threshold`: so each forward pass got
/// its big buffers as new pages, which the kernel zeroes (`clear_page`: 3.5% of a forward's samples in
/// `perf` on an AMD Zen 3, 1.4% with this, the rest at load; an Intel session saw ~2% page faults). Here
/// blocks up to 32 MiB (glibc's largest threshold) come from the heap and freed memory stays mapped: the
/// resident size stays at its peak instead of falling between passes. Call it once, first thing in
/// `main`; a no-op elsewhere than glibc.
pub fn keep_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; called before any thread allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Marks the whole huge pages inside `[block, block + len)` for THP (a hint: errors are ignored, and a
/// kernel with THP off or `never` simply keeps 4 KiB pages).
fn advise(block: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    if !block.is_null() && len >= MIN_BYTES {
        let start = (block as usize).next_multiple_of(HUGE_PAGE);
        let end = (block as usize + len) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside a block this process owns; MADV_HUGEPAGE changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (block, len);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping in /proc/self/smaps that holds `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_once(' ')
                .and_then(|(range, _)| range.split_once('-'));
            let bounds = range.and_then(|(lo, hi)| {
                Some((
                    usize::from_str_radix(lo, 16).ok()?,
                    usize::from_str_radix(hi, 16).ok()?,
                ))
            });
            if let Some((lo, hi)) = bounds {
                inside = (lo..hi).contains(&addr);
            } else if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
                return flags.trim().to_string();
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn big_blocks_are_marked_for_huge_pages_and_small_ones_are_not() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("SKIPPED: this kernel was built without transparent huge pages");
            return;
        }
        let big = Layout::from_size_align(16 << 20, 64).unwrap();
        let small = Layout::from_size_align(1 << 20, 64).unwrap();
        unsafe {
            let b = HugePages.alloc_zeroed(big);
            let s = HugePages.alloc(small);
            let inner = (b as usize).next_multiple_of(HUGE_PAGE);
            let flags = vm_flags(inner)
                .split(' ')
                .map(str::to_string)
                .collect::<Vec<_>>();
            assert!(
                flags.iter().any(|f| f == "hg"),
                "big block's flags: {flags:?}"
            );
            let flags = vm_flags(s as usize);
            assert!(
                !flags.split(' ').any(|f| f == "hg"),
                "small block's flags: {flags}"
            );
            // Contents survive a grow (realloc may move the block) and the new block is marked too.
            std::ptr::write_bytes(b, 7, big.size());
            let g = HugePages.realloc(b, big, 40 << 20);
            assert!((0..big.size()).step_by(4099).all(|i| *g.add(i) == 7));
            let inner = (g as usize).next_multiple_of(HUGE_PAGE);
            assert!(vm_flags(inner).split(' ').any(|f| f == "hg"));
            HugePages.dealloc(g, Layout::from_size_align(40 << 20, 64).unwrap());
            HugePages.dealloc(s, small);
        }
    }
}
