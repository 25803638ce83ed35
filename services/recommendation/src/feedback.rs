//! The durable feedback log: an append-only file of framed records, fsync'd before an event
//! is acknowledged, replayed at start, compacted (rewritten without a user) by `ForgetUser`.
//!
//! Format: an 8-byte header `MQFBLOG1`, then records `len: u32 LE | crc32(payload): u32 LE |
//! payload`. Payload: `kind: u8` (1 feedback, 2 forget), `user: [u8; 16]` (keyed hash, never
//! the raw id), and for feedback `item_id: i64 LE | event: u8 | timestamp_ms: i64 LE`.
//!
//! A crash can leave a torn last record (short frame or bad CRC). Replay stops at the first
//! record that does not check out, truncates the file to the last good record and fsyncs it:
//! nothing after a bad record can be trusted, and everything acknowledged before it was
//! fsync'd whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::privacy::UserHash;

/// File header: format name and version.
pub const MAGIC: &[u8; 8] = b"MQFBLOG1";
/// Largest payload replay accepts; a larger length is a torn or corrupt frame.
const MAX_PAYLOAD: u32 = 1024;

/// What a user did (the `FeedbackEvent` proto values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Click = 1,
    Watch = 2,
    Like = 3,
    Dislike = 4,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Click),
            2 => Some(Self::Watch),
            3 => Some(Self::Like),
            4 => Some(Self::Dislike),
            _ => None,
        }
    }

    /// Metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Click => "click",
            Self::Watch => "watch",
            Self::Like => "like",
            Self::Dislike => "dislike",
        }
    }

    /// Whether the item enters the history the user tower reads (a dislike only hides it).
    pub fn is_positive(self) -> bool {
        self != Self::Dislike
    }
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Feedback {
        user: UserHash,
        item_id: i64,
        event: EventKind,
        timestamp_ms: i64,
    },
    /// The user was forgotten: replay drops their training history too.
    Forget { user: UserHash },
}

impl Record {
    pub fn user(&self) -> UserHash {
        match self {
            Self::Feedback { user, .. } | Self::Forget { user } => *user,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(34);
        match self {
            Self::Feedback {
                user,
                item_id,
                event,
                timestamp_ms,
            } => {
                p.push(1);
                p.extend_from_slice(&user.0);
                p.extend_from_slice(&item_id.to_le_bytes());
                p.push(*event as u8);
                p.extend_from_slice(&timestamp_ms.to_le_bytes());
            }
            Self::Forget { user } => {
                p.push(2);
                p.extend_from_slice(&user.0);
            }
        }
        let mut frame = Vec::with_capacity(8 + p.len());
        frame.extend_from_slice(&(p.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
        frame.extend_from_slice(&p);
        frame
    }

    fn decode(p: &[u8]) -> Option<Self> {
        let user = UserHash(p.get(1..17)?.try_into().ok()?);
        match *p.first()? {
            1 if p.len() == 34 => Some(Self::Feedback {
                user,
                item_id: i64::from_le_bytes(p[17..25].try_into().ok()?),
                event: EventKind::from_u8(p[25])?,
                timestamp_ms: i64::from_le_bytes(p[26..34].try_into().ok()?),
            }),
            2 if p.len() == 17 => Some(Self::Forget { user }),
            _ => None,
        }
    }
}

/// What replay found.
#[derive(Debug, Default)]
pub struct Replay {
    pub records: Vec<Record>,
    /// Bytes of a torn or corrupt tail that were cut off.
    pub dropped_bytes: u64,
}

/// The open log.
pub struct FeedbackLog {
    path: PathBuf,
    file: File,
    records: u64,
}

/// fsync a directory, so a created or renamed entry survives a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Reads every good record of `bytes` (after the header); returns them and the length of the
/// good prefix.
fn parse(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut pos = MAGIC.len();
    while let Some(head) = bytes.get(pos..pos + 8) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            break;
        }
        let Some(payload) = bytes.get(pos + 8..pos + 8 + len as usize) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(r) = Record::decode(payload) else {
            break;
        };
        records.push(r);
        pos += 8 + len as usize;
    }
    (records, pos.min(bytes.len()))
}

impl FeedbackLog {
    /// Opens (or creates) the log at `path`, replays it, and cuts off a torn tail.
    pub fn open(path: &Path) -> std::io::Result<(Self, Replay)> {
        let dir = parent(path);
        std::fs::create_dir_all(dir)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut replay = Replay::default();
        if bytes.len() < MAGIC.len() && MAGIC.starts_with(&bytes) {
            // New file, or a crash while writing the header: start it afresh.
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(MAGIC)?;
            file.sync_all()?;
            sync_dir(dir)?;
            replay.dropped_bytes = bytes.len() as u64;
        } else if !bytes.starts_with(MAGIC) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "`{}` is not a feedback log (no `MQFBLOG1` header); refusing to touch it",
                    path.display()
                ),
            ));
        } else {
            let (records, good) = parse(&bytes);
            if good < bytes.len() {
                replay.dropped_bytes = (bytes.len() - good) as u64;
                file.set_len(good as u64)?;
                file.sync_all()?;
            }
            replay.records = records;
        }
        file.seek(SeekFrom::End(0))?;
        let records = replay.records.len() as u64;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                records,
            },
            replay,
        ))
    }

    /// Appends one record and fsyncs it; returns its sequence number (0-based).
    pub fn append(&mut self, record: &Record) -> std::io::Result<u64> {
        let frame = record.encode();
        // One write: a crash leaves the whole frame, a prefix of it (torn, dropped at
        // replay) or nothing.
        self.file.write_all(&frame)?;
        self.file.sync_data()?;
        self.records += 1;
        Ok(self.records - 1)
    }

    /// Records in the log.
    pub fn len(&self) -> u64 {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Rewrites the log without any record of `user`, then appends a `Forget` tombstone (so
    /// replay also drops the user's training history). Write to a temporary file, fsync it,
    /// rename over the log, fsync the directory: a crash leaves the old or the new log, never a
    /// mix. Returns how many records of the user were removed.
    pub fn forget(&mut self, user: UserHash) -> std::io::Result<u64> {
        let bytes = std::fs::read(&self.path)?;
        let (records, _) = parse(&bytes);
        let before = records.len();
        let kept: Vec<Record> = records.into_iter().filter(|r| r.user() != user).collect();
        let removed = (before - kept.len()) as u64;
        let tmp = self.path.with_extension("compact.tmp");
        {
            let mut out = File::create(&tmp)?;
            let mut buf = Vec::with_capacity(bytes.len());
            buf.extend_from_slice(MAGIC);
            for r in kept.iter().chain(std::iter::once(&Record::Forget { user })) {
                buf.extend_from_slice(&r.encode());
            }
            out.write_all(&buf)?;
            out.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(parent(&self.path))?;
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.file.seek(SeekFrom::End(0))?;
        self.records = kept.len() as u64 + 1;
        Ok(removed)
    }
}

/// Reads a log without modifying it (tests and tools).
pub fn read_all(path: &Path) -> std::io::Result<Replay> {
    let bytes = std::fs::read(path)?;
    if !bytes.starts_with(MAGIC) {
        return Ok(Replay {
            records: Vec::new(),
            dropped_bytes: bytes.len() as u64,
        });
    }
    let (records, good) = parse(&bytes);
    Ok(Replay {
        records,
        dropped_bytes: (bytes.len() - good) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fb(u: u8, item: i64) -> Record {
        Record::Feedback {
            user: UserHash([u; 16]),
            item_id: item,
            event: EventKind::Watch,
            timestamp_ms: 1_700_000_000_000 + item,
        }
    }

    #[test]
    fn appended_records_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        {
            let (mut log, replay) = FeedbackLog::open(&path).unwrap();
            assert!(replay.records.is_empty());
            assert_eq!(log.append(&fb(1, 10)).unwrap(), 0);
            assert_eq!(log.append(&fb(2, 20)).unwrap(), 1);
        }
        let (log, replay) = FeedbackLog::open(&path).unwrap();
        assert_eq!(replay.records, vec![fb(1, 10), fb(2, 20)]);
        assert_eq!(replay.dropped_bytes, 0);
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn torn_last_record_is_dropped_and_file_truncated_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        {
            let (mut log, _) = FeedbackLog::open(&path).unwrap();
            log.append(&fb(1, 10)).unwrap();
            log.append(&fb(1, 11)).unwrap();
        }
        let full = std::fs::read(&path).unwrap();
        let good_len = MAGIC.len() + 42;
        // Cut the second record at every byte inside it.
        for cut in good_len..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (mut log, replay) = FeedbackLog::open(&path).unwrap();
            assert_eq!(replay.records, vec![fb(1, 10)], "cut at {cut}");
            assert_eq!(replay.dropped_bytes, (cut - good_len) as u64);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len as u64);
            // Appending after recovery yields a clean log.
            log.append(&fb(3, 30)).unwrap();
            drop(log);
            assert_eq!(read_all(&path).unwrap().records, vec![fb(1, 10), fb(3, 30)]);
        }
    }

    #[test]
    fn corrupt_crc_in_the_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        {
            let (mut log, _) = FeedbackLog::open(&path).unwrap();
            log.append(&fb(1, 10)).unwrap();
            log.append(&fb(1, 11)).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, replay) = FeedbackLog::open(&path).unwrap();
        assert_eq!(replay.records, vec![fb(1, 10)]);
        assert_eq!(replay.dropped_bytes, 42);
    }

    #[test]
    fn forget_rewrites_without_the_user_and_leaves_a_tombstone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        let (mut log, _) = FeedbackLog::open(&path).unwrap();
        log.append(&fb(1, 10)).unwrap();
        log.append(&fb(2, 20)).unwrap();
        log.append(&fb(1, 11)).unwrap();
        assert_eq!(log.forget(UserHash([1; 16])).unwrap(), 2);
        log.append(&fb(2, 21)).unwrap();
        drop(log);
        let replay = read_all(&path).unwrap();
        assert_eq!(
            replay.records,
            vec![
                fb(2, 20),
                Record::Forget {
                    user: UserHash([1; 16])
                },
                fb(2, 21)
            ]
        );
        let raw = std::fs::read(&path).unwrap();
        let mentions = raw.windows(16).filter(|w| *w == [1u8; 16]).count();
        assert_eq!(mentions, 1, "only the tombstone mentions the user");
        assert!(!dir.path().join("feedback.compact.tmp").exists());
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(FeedbackLog::open(&path).is_err());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"something else entirely",
            "left untouched"
        );
    }
}
