//! What a worker serves: a directory, or the demo site built into the binary.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::fs::Root;
use crate::http::{ETag, Validators};

/// The demo page's template; `{{pid}}`, `{{worker}}` and `{{version}}` are
/// filled in at start-up.
const DEMO_INDEX: &str = include_str!("../site/index.html");

/// The content being served.
#[derive(Debug)]
pub enum Site {
    /// Files beneath a directory.
    Dir(Root),
    /// The embedded demo site.
    Demo(Demo),
}

/// One in-memory page.
#[derive(Debug)]
pub struct Page {
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub validators: Validators,
}

/// The demo site, rendered once for this process.
#[derive(Debug)]
pub struct Demo {
    index: Page,
}

impl Demo {
    /// Renders the demo pages for worker `worker` of pid `pid`.
    pub fn new(pid: u32, worker: u32) -> Demo {
        let body = DEMO_INDEX
            .replace("{{pid}}", &pid.to_string())
            .replace("{{worker}}", &worker.to_string())
            .replace("{{version}}", env!("CARGO_PKG_VERSION"))
            .into_bytes();
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // The page differs per process, and so does its tag: a browser
        // revalidating against another worker gets that worker's page.
        let validators = Validators {
            mtime: started,
            etag: ETag::new(body.len() as u64, i64::from(pid), i64::from(worker)),
        };
        Demo {
            index: Page {
                body,
                content_type: "text/html; charset=utf-8",
                validators,
            },
        }
    }

    /// The page at normalised path `rel`, if any.
    pub fn page(&self, rel: &[u8]) -> Option<&Page> {
        match rel {
            b"" | b"index.html" => Some(&self.index),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_page_names_the_worker() {
        let d = Demo::new(4242, 7);
        let page = String::from_utf8(d.page(b"").unwrap().body.clone()).unwrap();
        assert!(page.contains(">4242<"));
        assert!(page.contains(">7<"));
        assert!(!page.contains("{{"));
        assert!(d.page(b"index.html").is_some());
        assert!(d.page(b"nope").is_none());
    }
}
