//! Test support for baton-static: an HTTP client and a fake acceptor.
#![allow(dead_code)]

pub mod client;
pub mod fake;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A document root in a fresh temporary directory, removed on drop:
///
/// ```text
/// DIR/secret.txt            outside the root: must never be served
/// DIR/www/index.html, hello.txt, style.css, "with space.txt"
/// DIR/www/big.bin           3 MiB, above the sendfile threshold
/// DIR/www/sub/index.html, sub/data.json
/// DIR/www/noindex/          a directory without index.html
/// DIR/www/link-in -> hello.txt, link-out -> ../secret.txt,
/// DIR/www/link-abs -> DIR/secret.txt, fifo (a named pipe)
/// ```
pub struct TestRoot {
    pub dir: PathBuf,
    pub www: PathBuf,
    pub big: Vec<u8>,
}

pub const SECRET: &str = "TOP SECRET: outside the root";

impl TestRoot {
    pub fn new(name: &str) -> TestRoot {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "baton-static-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("sub")).unwrap();
        std::fs::create_dir_all(www.join("noindex")).unwrap();
        std::fs::write(dir.join("secret.txt"), SECRET).unwrap();
        std::fs::write(www.join("index.html"), "<h1>home</h1>\n").unwrap();
        std::fs::write(www.join("hello.txt"), "hello, world\n").unwrap();
        std::fs::write(www.join("style.css"), "body { color: red }\n").unwrap();
        std::fs::write(www.join("with space.txt"), "spaced\n").unwrap();
        std::fs::write(www.join("sub/index.html"), "<p>sub</p>\n").unwrap();
        std::fs::write(www.join("sub/data.json"), "{\"a\":1}\n").unwrap();
        let big = client::pattern(3 * 1024 * 1024 + 17, 7);
        std::fs::write(www.join("big.bin"), &big).unwrap();
        std::os::unix::fs::symlink("hello.txt", www.join("link-in")).unwrap();
        std::os::unix::fs::symlink("../secret.txt", www.join("link-out")).unwrap();
        std::os::unix::fs::symlink(dir.join("secret.txt"), www.join("link-abs")).unwrap();
        let fifo = std::ffi::CString::new(www.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: `fifo` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        TestRoot { dir, www, big }
    }

    pub fn www(&self) -> &str {
        self.www.to_str().unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.www.join(rel)
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
