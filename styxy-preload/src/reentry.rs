//! The re-entry guard: a bind made by anything the shim calls on the way goes straight through.

use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Marks the threads that are inside the shim, so a bind made on the way (by anything we call)
/// goes straight through instead of recursing. A pthread key (no std thread-locals here); stored
/// as key + 1, 0 until created.
static IN_SHIM_KEY: AtomicUsize = AtomicUsize::new(0);

fn in_shim_key() -> Option<libc::pthread_key_t> {
    let stored = IN_SHIM_KEY.load(Ordering::Acquire);
    if stored != 0 {
        return libc::pthread_key_t::try_from(stored - 1).ok();
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: key is valid for writes; no destructor.
    if unsafe { libc::pthread_key_create(&mut key, None) } != 0 {
        return None;
    }
    let ours = key as usize + 1;
    match IN_SHIM_KEY.compare_exchange(0, ours, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(theirs) => {
            // Another thread created one first: use theirs.
            // SAFETY: key was created above and never handed out.
            unsafe { libc::pthread_key_delete(key) };
            libc::pthread_key_t::try_from(theirs - 1).ok()
        }
    }
}

pub(crate) struct ReentryGuard(libc::pthread_key_t);

impl ReentryGuard {
    /// `None` when this thread is already inside the shim (or no key could be had).
    pub(crate) fn enter() -> Option<ReentryGuard> {
        let key = in_shim_key()?;
        // SAFETY: key is a live key of this process.
        if !unsafe { libc::pthread_getspecific(key) }.is_null() {
            return None;
        }
        // Any non-null value marks the thread; this one points at the key's own static.
        let mark = (&raw const IN_SHIM_KEY).cast::<c_void>();
        // SAFETY: as above; the value is never dereferenced.
        (unsafe { libc::pthread_setspecific(key, mark) } == 0).then_some(ReentryGuard(key))
    }
}

impl Drop for ReentryGuard {
    fn drop(&mut self) {
        // SAFETY: the key is live; clearing this thread's value.
        unsafe { libc::pthread_setspecific(self.0, core::ptr::null()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_thread_is_marked_inside_the_shim() {
        let guard = ReentryGuard::enter().expect("first entry");
        assert!(ReentryGuard::enter().is_none(), "re-entry must be refused");
        std::thread::spawn(|| assert!(ReentryGuard::enter().is_some(), "other threads enter"))
            .join()
            .expect("thread");
        drop(guard);
        assert!(ReentryGuard::enter().is_some(), "entry again once left");
    }
}
