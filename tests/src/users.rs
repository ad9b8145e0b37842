//! Who the tests run as, and acting as another user.

/// Whether the tests run as root (needed for the tests that act as another user).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The uid the tests act as when they need another user than root (`nobody`).
pub const OTHER_USER: u32 = 65534;

/// Whether a test may act as [`OTHER_USER`] (it needs root); says SKIP when not, and fails in CI,
/// which runs the tests as root.
pub fn can_act_as_another_user() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs the tests as root"
    );
    eprintln!("SKIP: acting as another user needs root");
    false
}
