//! BPF array maps created `BPF_F_MMAPABLE`, mapped into the daemon's memory: reading or writing a
//! slot is a plain atomic load or store, no syscall. The kernel programs use atomic operations on
//! the same memory, so every access here goes through `AtomicU32`/`AtomicU64`.

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// An atomic type the size of a map value.
pub trait Slot {}
impl Slot for AtomicU32 {}
impl Slot for AtomicU64 {}

/// A shared mapping of an mmapable BPF array of `len` values.
pub struct MappedArray<A: Slot> {
    base: NonNull<A>,
    len: usize,
    _slots: PhantomData<A>,
}

// SAFETY: the mapping is shared memory accessed only through atomics, from any thread.
unsafe impl<A: Slot> Send for MappedArray<A> {}
// SAFETY: as above.
unsafe impl<A: Slot> Sync for MappedArray<A> {}

impl<A: Slot> MappedArray<A> {
    /// Maps the array behind `fd` (read-only unless `writable`); `None` when the kernel refuses
    /// (an array made without `BPF_F_MMAPABLE`, or an old kernel).
    pub fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> Option<MappedArray<A>> {
        let bytes = Self::bytes_for(len);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping a BPF array map's fd, shared, at offset 0, for exactly its size; the
        // result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(MappedArray {
            base: NonNull::new(ptr.cast())?,
            len,
            _slots: PhantomData,
        })
    }

    /// The kernel lays array values out 8 bytes apart, whatever their size.
    const STRIDE: usize = 8;

    fn bytes_for(len: usize) -> usize {
        len * Self::STRIDE
    }

    /// The slot at `index` (clamped to the last one, which callers never pass).
    pub fn slot(&self, index: usize) -> &A {
        let index = index.min(self.len.saturating_sub(1));
        // SAFETY: index < len; the mapping holds len values STRIDE bytes apart from a
        // page-aligned base, so each is aligned for A (4 or 8 bytes, no larger than STRIDE); it
        // lives as long as self.
        unsafe {
            &*self
                .base
                .as_ptr()
                .cast::<u8>()
                .add(index * Self::STRIDE)
                .cast::<A>()
        }
    }
}

impl<A: Slot> Drop for MappedArray<A> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::bytes_for(self.len)) };
    }
}
