//! The one-line notice of a move (`✓ STYXY: Auto-assigned port …`), written where the host can
//! take it without blocking, and never as a SIGPIPE.

use core::ffi::{c_int, c_void};

use styxy_common::env;
use styxy_common::shim::BindAnswer;

use crate::sys::{env_str, errno, StackBuf};

/// Whether notices are wanted at all (`STYXY_NOTIFY` is not `off`, `none` or `0`).
pub(crate) fn notices_on() -> bool {
    !matches!(
        env_str(env::NOTIFY.c_name),
        Some(b"off") | Some(b"none") | Some(b"0")
    )
}

pub(crate) fn notify(requested: u16, answer: &BindAnswer) {
    if !notices_on() {
        return;
    }
    let fd = match env_str(env::NOTIFY.c_name) {
        Some(b"stdout") => libc::STDOUT_FILENO,
        _ => libc::STDERR_FILENO,
    };
    if !may_take_the_notice(fd) {
        return;
    }
    let line = notice_line(requested, answer);
    without_sigpipe(|| {
        let mut rest = line.as_bytes();
        while !rest.is_empty() {
            // SAFETY: rest is a valid readable buffer of rest.len() bytes.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast::<c_void>(), rest.len()) };
            if n > 0 {
                rest = rest.get(n.unsigned_abs()..).unwrap_or_default();
            } else if n < 0 && errno() == libc::EINTR {
                continue;
            } else {
                break;
            }
        }
    });
}

/// Whether the notice may go to `fd`: a terminal, a pipe or a file that can take it right now.
/// Never a socket — a host that closed 0–2 may have its own connection there, or it may be the
/// shim's own connection to the daemon — nor anything else, nor a full pipe or a stopped
/// terminal (the write would block the host), nor a pipe nobody reads.
fn may_take_the_notice(fd: c_int) -> bool {
    // SAFETY: stat is plain data; fstat writes it (or fails on a closed fd).
    let mut stat: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: stat is valid for writes.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return false;
    }
    let kind = stat.st_mode & libc::S_IFMT;
    if kind == libc::S_IFREG {
        return true;
    }
    if kind != libc::S_IFCHR && kind != libc::S_IFIFO {
        return false;
    }
    let mut ready = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut ready, 1, 0) };
    n == 1
        && ready.revents & libc::POLLOUT != 0
        && ready.revents & (libc::POLLERR | libc::POLLHUP) == 0
}

/// Runs `write` with SIGPIPE blocked on this thread, and takes back a SIGPIPE that `write`
/// raised (a reader gone between the check and the write), so the host never sees one of ours;
/// a SIGPIPE that was pending before is left for the host.
fn without_sigpipe(write: impl FnOnce()) {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut pipe: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let mut saved: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let mut pending: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: valid sigset_t pointers; these calls only read and write them and this thread's mask.
    let blocked = unsafe {
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        libc::sigemptyset(&mut pending);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut saved) == 0
    };
    if !blocked {
        // Cannot block it: leave the notice out rather than risk the host's life.
        return;
    }
    // SAFETY: pending is a valid sigset_t.
    let was_pending = unsafe {
        libc::sigpending(&mut pending) == 0 && libc::sigismember(&pending, libc::SIGPIPE) == 1
    };
    write();
    if !was_pending {
        let none = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: takes a pending SIGPIPE of this thread or process, if any, without waiting.
        unsafe { libc::sigtimedwait(&pipe, core::ptr::null_mut(), &none) };
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, core::ptr::null_mut()) };
}

/// Room for the notice: its words, three numbers and a holder description of at most
/// `HOLDER_NAME_LEN - 1` (127) bytes.
const NOTICE_ROOM: usize = 256;

/// `✓ STYXY: Auto-assigned port NEW (ASKED in use by HOLDER, pid PID)` and a newline.
pub(crate) fn notice_line(requested: u16, answer: &BindAnswer) -> StackBuf<NOTICE_ROOM> {
    let mut line = StackBuf::new();
    line.push("✓ STYXY: Auto-assigned port ".as_bytes());
    line.push_decimal(answer.port.into());
    line.push(b" (");
    line.push_decimal(requested.into());
    line.push(b" in use by ");
    let mut name = answer
        .holder_name
        .iter()
        .take_while(|&&b| b != 0)
        .peekable();
    if name.peek().is_none() {
        line.push(b"another process");
    }
    for &byte in name {
        // The name comes from another process's command line: no control characters on a terminal.
        let shown = if byte < 0x20 || byte == 0x7f {
            b'?'
        } else {
            byte
        };
        line.push(&[shown]);
    }
    if answer.holder_pid != 0 {
        line.push(b", pid ");
        line.push_decimal(answer.holder_pid);
    }
    line.push(b")\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use styxy_common::shim::ACTION_REASSIGN;
    fn answer(port: u16, pid: u32, name: &str) -> BindAnswer {
        let mut a = BindAnswer::empty();
        a.action = ACTION_REASSIGN;
        a.port = port;
        a.holder_pid = pid;
        a.set_holder_name(name);
        a
    }

    fn notice(requested: u16, answer: &BindAnswer) -> String {
        String::from_utf8(notice_line(requested, answer).as_bytes().to_vec()).expect("UTF-8")
    }

    #[test]
    fn notice_names_both_ports_and_the_holder() {
        assert_eq!(
            notice(6006, &answer(6007, 4121, "`storybook dev -p 6006`, session feature-x")),
            "✓ STYXY: Auto-assigned port 6007 (6006 in use by `storybook dev -p 6006`, session feature-x, pid 4121)\n"
        );
        assert_eq!(
            notice(8000, &answer(8001, 0, "")),
            "✓ STYXY: Auto-assigned port 8001 (8000 in use by another process)\n"
        );
        assert_eq!(
            notice(1, &answer(65535, u32::MAX, "a\x1b[2Jb")),
            "✓ STYXY: Auto-assigned port 65535 (1 in use by a?[2Jb, pid 4294967295)\n"
        );
    }

    #[test]
    fn the_longest_notice_fits() {
        let name = "é".repeat(styxy_common::shim::HOLDER_NAME_LEN);
        let line = notice(65535, &answer(65535, u32::MAX, &name));
        assert!(line.ends_with(", pid 4294967295)\n"), "{line}");
    }
}
