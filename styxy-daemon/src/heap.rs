//! The daemon's live heap, counted by its allocator: the bytes its program holds right now, as
//! opposed to its resident memory, which also counts what the allocator keeps free for reuse
//! (glibc's per-thread caches and arenas). Whether the daemon gives back what a burst of work
//! used is a question about the first; the metrics (`styxy_heap_live_bytes`) and the soak in
//! `cargo xtask bench soak` read it.
//!
//! The `styxy` binary installs [`CountingAllocator`] as its global allocator; a program that
//! links the daemon without it (the tests) reads `None`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};

/// Counters the threads share out (a thread keeps one for its life; past [`SLOTS`] threads,
/// two share one). Summed, they are the live heap: a block freed on another thread than the one
/// that allocated it counts out there, and the sum is still right.
const SLOTS: usize = 64;

/// One counter on a cache line of its own: threads adding to theirs never contend. With one
/// counter for all, two threads allocating at once made an allocation and its free 5.4× the
/// system allocator's (`cargo xtask bench footprint`, which prints the ratio).
#[repr(align(64))]
struct Slot(AtomicIsize);

static COUNTERS: [Slot; SLOTS] = [const { Slot(AtomicIsize::new(0)) }; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's counter (`usize::MAX` until its first allocation). A const initialiser and
    /// no destructor: reading it never allocates and never fails, as an allocator needs.
    static THIS_THREADS_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The calling thread's counter.
fn counter() -> &'static AtomicIsize {
    let slot = THIS_THREADS_SLOT
        .try_with(|slot| {
            if slot.get() == usize::MAX {
                slot.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS);
            }
            slot.get()
        })
        .unwrap_or(0);
    &COUNTERS[slot].0
}

/// The system allocator, counting the bytes handed out and not yet freed on a counter of the
/// calling thread's (one uncontended atomic add per call).
pub struct CountingAllocator;

impl CountingAllocator {
    fn count_in(size: usize) {
        counter().fetch_add(size as isize, Ordering::Relaxed);
    }

    fn count_out(size: usize) {
        counter().fetch_sub(size as isize, Ordering::Relaxed);
    }
}

/// The sum of the counters.
fn counted() -> usize {
    let sum: isize = COUNTERS
        .iter()
        .map(|slot| slot.0.load(Ordering::Relaxed))
        .sum();
    sum.max(0) as usize
}

// SAFETY: every call is passed to `System` unchanged; the counting touches only an atomic and
// never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, forwarded.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::count_in(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, forwarded.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::count_in(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, forwarded.
        unsafe { System.dealloc(ptr, layout) };
        Self::count_out(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, forwarded.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // One add of the difference (a Vec's growth is a realloc: hot).
            counter().fetch_add(
                (new_size as isize).wrapping_sub(layout.size() as isize),
                Ordering::Relaxed,
            );
        }
        new
    }
}

/// Marks the counting allocator as this process's (called by the binary that installs it, before
/// anything reads [`live_bytes`]).
pub fn counting_installed() {
    INSTALLED.store(true, Ordering::Relaxed);
}

/// The bytes the program holds on its heap now, or `None` when this process does not count them.
/// (Allocations made before `main` count too: the counter starts with the process.)
pub fn live_bytes() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counter's arithmetic, driven directly (a test binary has its own allocator).
    #[test]
    fn allocations_count_in_and_frees_count_out() {
        let counting = CountingAllocator;
        let before = counted();
        let layout = Layout::from_size_align(1000, 8).expect("a valid layout");
        // SAFETY: a valid non-zero layout; every block is freed with the layout it has.
        unsafe {
            let a = counting.alloc(layout);
            assert!(!a.is_null());
            assert_eq!(counted() - before, 1000);
            let b = counting.realloc(a, layout, 3000);
            assert!(!b.is_null());
            assert_eq!(counted() - before, 3000);
            let grown = Layout::from_size_align(3000, 8).expect("a valid layout");
            counting.dealloc(b, grown);
            let z = counting.alloc_zeroed(layout);
            assert!(!z.is_null());
            assert_eq!(*z, 0);
            counting.dealloc(z, layout);
        }
        assert_eq!(counted(), before);
        // Allocated on one thread, freed on another: counted out on the second's counter, and
        // the sum is back where it was.
        let block = std::thread::spawn(move || {
            // SAFETY: a valid non-zero layout.
            unsafe { CountingAllocator.alloc(layout) as usize }
        })
        .join()
        .expect("the allocating thread");
        assert_eq!(counted() - before, 1000);
        std::thread::spawn(move || {
            // SAFETY: allocated above with this layout, freed once.
            unsafe { CountingAllocator.dealloc(block as *mut u8, layout) }
        })
        .join()
        .expect("the freeing thread");
        assert_eq!(counted(), before);
    }
}
