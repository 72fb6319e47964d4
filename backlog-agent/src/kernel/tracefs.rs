//! tracefs: where it is, mounting it when it is not, and reading the
//! record layout of a tracepoint from its `format` file (offsets in the
//! record change between kernels, e.g. `rx_sk` was added to
//! skb:kfree_skb in 6.11).

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at {TRACEFS} failed ({0}); \
         mount it with `mount -t tracefs nodev {TRACEFS}`"
    )]
    NotMounted(io::Error),
    #[error(
        "cannot read tracefs at {0} (it is root-only): missing capability \
         CAP_DAC_READ_SEARCH"
    )]
    Unreadable(String),
    #[error("tracepoint {category}:{name} does not exist on this kernel ({path}: {source})")]
    NoSuchEvent {
        category: String,
        name: String,
        path: PathBuf,
        source: io::Error,
    },
}

fn has_events(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Returns the tracefs mount point, mounting tracefs at
/// /sys/kernel/tracing when no mount is found (a minimal container or VM
/// often has none; aya needs it to attach tracepoints).
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if has_events(Path::new(dir)) {
            return Ok(PathBuf::from(dir));
        }
        // Mounted (mode 0700, root's) but closed to a non-root user
        // without CAP_DAC_READ_SEARCH: mounting again would only fail
        // with a misleading EPERM.
        if fs::metadata(Path::new(dir).join("events"))
            .is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
        {
            return Err(TracefsError::Unreadable(dir.to_owned()));
        }
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    let source = c"nodev";
    // SAFETY: all pointers are valid NUL-terminated strings that outlive
    // the call; data may be NULL for tracefs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::NotMounted(io::Error::last_os_error()));
    }
    if !has_events(Path::new(TRACEFS)) {
        return Err(TracefsError::NotMounted(io::Error::other(
            "mounted, but it has no events directory",
        )));
    }
    Ok(PathBuf::from(TRACEFS))
}

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordField {
    pub offset: u32,
    pub size: u32,
}

/// The record layout of one tracepoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFormat {
    pub fields: HashMap<String, RecordField>,
}

impl EventFormat {
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self, TracefsError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|source| TracefsError::NoSuchEvent {
            category: category.into(),
            name: name.into(),
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses lines like
    /// `field:void * rx_sk; offset:24; size:8; signed:0;` (tab-separated).
    /// Lines that do not parse are ignored: a field we need but cannot
    /// read is reported by `field()` by name.
    pub fn parse(text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut name = None;
            let mut offset = None;
            let mut size = None;
            for part in line.split(';') {
                let part = part.trim();
                if let Some(decl) = part.strip_prefix("field:") {
                    // The name is the last word, minus any array suffix.
                    name = decl
                        .rsplit(|c: char| c.is_whitespace() || c == '*')
                        .next()
                        .map(|n| n.split('[').next().unwrap_or(n).to_owned());
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            if let (Some(name), Some(offset), Some(size)) = (name, offset, size) {
                if !name.is_empty() {
                    fields.insert(name, RecordField { offset, size });
                }
            }
        }
        EventFormat { fields }
    }

    pub fn field(&self, name: &str) -> Option<RecordField> {
        self.fields.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KFREE_SKB_6_18: &str = "name: kfree_skb\nID: 2310\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;\n\
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\n\
print fmt: \"skbaddr=%p\", REC->skbaddr\n";

    #[test]
    fn parses_kfree_skb_format() {
        let format = EventFormat::parse(KFREE_SKB_6_18);
        assert_eq!(
            format.field("rx_sk"),
            Some(RecordField {
                offset: 24,
                size: 8
            })
        );
        assert_eq!(
            format.field("reason"),
            Some(RecordField {
                offset: 36,
                size: 4
            })
        );
        assert_eq!(format.field("skbaddr").map(|f| f.offset), Some(8));
        assert_eq!(format.field("common_pid").map(|f| f.size), Some(4));
        assert_eq!(format.field("nope"), None);
        // Where the kfree_skb program reads them (6.11+ layout).
        for (name, at) in [
            ("skbaddr", backlog_common::TP_KFREE_SKB_SKBADDR),
            ("rx_sk", backlog_common::TP_KFREE_SKB_RX_SK),
            ("reason", backlog_common::TP_KFREE_SKB_REASON),
        ] {
            assert_eq!(format.field(name).map(|f| f.offset as usize), Some(at));
        }
    }

    #[test]
    fn parses_arrays_and_ignores_garbage() {
        let format = EventFormat::parse(
            "\tfield:__u8 saddr[4];\toffset:28;\tsize:4;\tsigned:0;\nfield:broken\n;;;\n",
        );
        assert_eq!(
            format.field("saddr"),
            Some(RecordField {
                offset: 28,
                size: 4
            })
        );
        assert_eq!(format.fields.len(), 1);
    }

    #[test]
    fn old_kernel_without_rx_sk() {
        // 5.10..6.10: no rx_sk field.
        let format = EventFormat::parse(
            "\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
             \tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
             \tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n",
        );
        assert_eq!(format.field("rx_sk"), None);
        assert_eq!(format.field("reason"), None);
    }
}
