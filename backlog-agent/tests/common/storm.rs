//! A UNIX connect() EAGAIN storm: what nginx does to a saturated php-fpm
//! pool, at the rate one core can loop.

use std::{
    os::unix::{ffi::OsStrExt, io::AsRawFd, net::UnixListener},
    path::Path,
    time::{Duration, Instant},
};

/// What the client saw.
pub struct Storm {
    pub attempts: u64,
    /// connect() calls that failed with EAGAIN: the count the agent must
    /// account for exactly.
    pub eagain: u64,
    pub elapsed: Duration,
}

impl Storm {
    pub fn rate(&self) -> f64 {
        self.eagain as f64 / self.elapsed.as_secs_f64()
    }
}

fn sockaddr(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    (addr, len as libc::socklen_t)
}

/// One non-blocking connect() to `path`; the errno, 0 on success.
fn connect_once(addr: &libc::sockaddr_un, len: libc::socklen_t) -> (i32, i32) {
    // SAFETY: plain socket calls with a valid sockaddr_un and its length;
    // the caller closes the returned fd.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), len);
        let errno = if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        };
        (fd, errno)
    }
}

/// A UNIX stream listener at `path` with `backlog`, filled by
/// `backlog + 1` connects and never accepting; the fds that hold it full
/// are returned with it.
pub fn full_listener(path: &Path, backlog: i32) -> (UnixListener, Vec<i32>) {
    let listener = UnixListener::bind(path).expect("bind UNIX listener");
    // SAFETY: listen on a valid socket fd.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), backlog) }, 0);
    let (addr, len) = sockaddr(path);
    let held = (0..=backlog)
        .map(|_| {
            let (fd, errno) = connect_once(&addr, len);
            assert_eq!(errno, 0, "filling connect failed");
            fd
        })
        .collect();
    (listener, held)
}

/// Loops socket() + non-blocking connect() + close() against the full
/// listener at `path` for at most `attempts` calls or `limit` time.
pub fn storm(path: &Path, attempts: u64, limit: Duration) -> Storm {
    let (addr, len) = sockaddr(path);
    let started = Instant::now();
    let mut storm = Storm {
        attempts: 0,
        eagain: 0,
        elapsed: Duration::ZERO,
    };
    while storm.attempts < attempts {
        // Checking the clock every 1024 calls keeps it off the loop's cost.
        if storm.attempts.is_multiple_of(1024) && started.elapsed() >= limit {
            break;
        }
        let (fd, errno) = connect_once(&addr, len);
        storm.attempts += 1;
        if errno == libc::EAGAIN {
            storm.eagain += 1;
        }
        // SAFETY: closing the fd connect_once opened.
        unsafe { libc::close(fd) };
    }
    storm.elapsed = started.elapsed();
    storm
}

/// Closes the fds that held a listener full.
pub fn release(held: Vec<i32>) {
    for fd in held {
        // SAFETY: fds opened by full_listener and not closed elsewhere.
        unsafe { libc::close(fd) };
    }
}
