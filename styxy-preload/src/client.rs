//! The daemon, asked through the client library (`libstyxy_shim_client.so`), `dlopen()`ed by the
//! first bind that needs it.

use core::ffi::{c_char, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use styxy_common::env;
use styxy_common::shim::{
    AbiVersionFn, BindAnswer, BindQuery, ResolveBindFn, ABI_VERSION, ABI_VERSION_SYMBOL,
    CLIENT_LIBRARY, RESOLVE_BIND_SYMBOL, RESOLVE_OK, RESOLVE_TIMEOUT, WHO_HOLDS_SYMBOL,
};

use crate::sys::{env_str, StackBuf};

/// What asking the daemon gave.
pub(crate) enum Reply {
    Answer(BindAnswer),
    /// No daemon (or it refused to answer): bind as asked, and do not ask again for a while.
    Down,
    /// The daemon is there but did not answer within the deadline.
    Slow,
}

/// One `ResolveBind` through the client library.
pub(crate) fn ask(query: &BindQuery) -> Reply {
    let Some(resolve) = client() else {
        return Reply::Down;
    };
    let mut answer = BindAnswer::empty();
    // SAFETY: both pointers are valid for the call; the client library does not keep them.
    match unsafe { resolve(query, &mut answer) } {
        RESOLVE_OK => Reply::Answer(answer),
        RESOLVE_TIMEOUT => Reply::Slow,
        _ => Reply::Down,
    }
}

/// Who holds the query's port: the answer's holder filled, or nothing when the daemon cannot
/// say (the notice then names no holder).
pub(crate) fn who_holds(query: &BindQuery, answer: &mut BindAnswer) {
    if client().is_none() {
        return;
    }
    let ptr = WHO_HOLDS.load(Ordering::Acquire);
    if ptr.is_null() {
        return;
    }
    // SAFETY: only ever set to the client library's who-holds function, whose signature is
    // ResolveBindFn's (checked by name and ABI version in load_client).
    let who_holds = unsafe { core::mem::transmute::<*mut c_void, ResolveBindFn>(ptr) };
    // SAFETY: both pointers are valid for the call; the client library does not keep them.
    unsafe { who_holds(query, answer) };
}

static RESOLVE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static WHO_HOLDS: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static CLIENT_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

fn client() -> Option<ResolveBindFn> {
    let ptr = RESOLVE.load(Ordering::Acquire);
    if !ptr.is_null() {
        // SAFETY: only ever set to the client library's resolve function, checked below.
        return Some(unsafe { core::mem::transmute::<*mut c_void, ResolveBindFn>(ptr) });
    }
    if CLIENT_UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let loaded = load_client();
    if loaded.is_none() {
        CLIENT_UNAVAILABLE.store(true, Ordering::Relaxed);
    }
    loaded
}

fn load_client() -> Option<ResolveBindFn> {
    let path = client_library_path()?;
    // dlopen is thread-safe and returns the same handle to concurrent callers. The library is
    // never closed (RTLD_NODELETE): the function pointer kept below must stay valid.
    // SAFETY: path is NUL-terminated (client_library_path checks).
    let handle = unsafe {
        libc::dlopen(
            path.as_bytes().as_ptr().cast::<c_char>(),
            libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    };
    if handle.is_null() {
        return None;
    }
    // SAFETY: handle is a live library handle and the names are NUL-terminated.
    let (version, resolve, who_holds) = unsafe {
        (
            libc::dlsym(handle, ABI_VERSION_SYMBOL.as_ptr()),
            libc::dlsym(handle, RESOLVE_BIND_SYMBOL.as_ptr()),
            libc::dlsym(handle, WHO_HOLDS_SYMBOL.as_ptr()),
        )
    };
    if version.is_null() || resolve.is_null() || who_holds.is_null() {
        return None;
    }
    // SAFETY: the symbol is the client library's version function (checked by name).
    let version = unsafe { core::mem::transmute::<*mut c_void, AbiVersionFn>(version) };
    // SAFETY: it takes no arguments and has no preconditions.
    if unsafe { version() } != ABI_VERSION {
        return None;
    }
    WHO_HOLDS.store(who_holds, Ordering::Release);
    RESOLVE.store(resolve, Ordering::Release);
    // SAFETY: the symbol is the resolve function of a library with our ABI version.
    Some(unsafe { core::mem::transmute::<*mut c_void, ResolveBindFn>(resolve) })
}

/// Room for a path, its NUL included (PATH_MAX).
const PATH_ROOM: usize = libc::PATH_MAX as usize;

/// `$STYXY_CLIENT_LIB`, else `libstyxy_shim_client.so` in the directory this library was loaded
/// from; NUL-terminated. `None` when the path does not fit in PATH_MAX.
fn client_library_path() -> Option<StackBuf<PATH_ROOM>> {
    let mut path = StackBuf::new();
    if let Some(overridden) = env_str(env::CLIENT_LIB.c_name) {
        return (path.push(overridden) && path.push(b"\0")).then_some(path);
    }
    // SAFETY: Dl_info is plain data; dladdr fills it for an address inside a loaded object.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: any address is accepted; this function is inside this library.
    let found = unsafe { libc::dladdr(client_library_path as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr sets dli_fname to a NUL-terminated path.
    let ours = unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes();
    // Loaded by a bare name (no slash): let dlopen search for the client the same way.
    let directory = match ours.iter().rposition(|&b| b == b'/') {
        Some(slash) => ours.get(..=slash).unwrap_or_default(),
        None => &[],
    };
    let fits = path.push(directory) && path.push(CLIENT_LIBRARY.as_bytes()) && path.push(b"\0");
    fits.then_some(path)
}
