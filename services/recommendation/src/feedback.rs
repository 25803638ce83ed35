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
//!
//! Since replay stops at the first bad record, no record may ever follow one: a write or fsync
//! that fails (a full disk: `ENOSPC`, `EFBIG`; an I/O error) can leave part of a record behind,
//! so the log cuts the file back to the end of the last good record and fsyncs that before it
//! answers, and until that cut has succeeded it refuses every write (`UNAVAILABLE`). So an
//! acknowledged record is always followed only by whole, acknowledged records, and replay (and
//! compaction, which parses the same way) sees every one of them.

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

/// Why the log did not take a record. Either way the record was not acknowledged, and nothing
/// of it will be replayed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Writing or fsyncing the record failed and whatever it left was cut off again: the log
    /// is whole and takes the next record.
    #[error("writing the feedback log failed ({0}); the event was not recorded, retry later")]
    Write(std::io::Error),
    /// The log takes no records until a repair succeeds: cutting off a partial record, or
    /// reopening the log after a compaction. Each later write retries the repair first.
    #[error("the feedback log is not writable ({0}); the event was not recorded, retry later")]
    Unavailable(String),
    /// A compaction (`ForgetUser`) failed before replacing the log: the old log is in place,
    /// unchanged.
    #[error("compacting the feedback log failed ({0}); nothing was forgotten, retry later")]
    Compact(std::io::Error),
}

/// What the log needs of its file: a `File` in production, a fake that fails on cue in the
/// unit tests of [`Tail`].
pub trait LogFile {
    /// Writes all of `buf` at byte `offset`. A failure may leave any prefix of it written.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes the written data durable.
    fn sync_data(&mut self) -> std::io::Result<()>;
    /// Cuts the file to `len` bytes and makes the new length durable.
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
}

impl LogFile for File {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.seek(SeekFrom::Start(offset))?;
        self.write_all(buf)
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        File::sync_data(self)
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.sync_all()
    }
}

/// The appending end of the log: the file, where its last good record ends, and whether bytes
/// after that end (a partial record) must be cut off before anything else is written.
pub struct Tail<F> {
    file: F,
    end: u64,
    dirty: bool,
}

impl<F: LogFile> Tail<F> {
    /// A tail whose file holds `end` good bytes; `dirty` when bytes after them may exist.
    pub fn new(file: F, end: u64, dirty: bool) -> Self {
        Self { file, end, dirty }
    }

    /// Length of the good records (header included).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Writes and fsyncs one frame after the last good record. On failure the frame's leftovers
    /// are cut off at once; if that fails too, the tail stays dirty and refuses frames until a
    /// later cut succeeds.
    pub fn append(&mut self, frame: &[u8]) -> Result<(), LogError> {
        if self.dirty {
            self.repair().map_err(|e| {
                LogError::Unavailable(format!("cutting off a partial record failed: {e}"))
            })?;
        }
        let written = self
            .file
            .write_all_at(frame, self.end)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.end += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the frame may be on disk (a write cut short by a full disk), or all of
                // it without a durable fsync: either way it was not acknowledged and must go.
                self.dirty = true;
                match self.repair() {
                    Ok(()) => Err(LogError::Write(e)),
                    Err(cut) => Err(LogError::Unavailable(format!(
                        "{e}; cutting off the partial record failed too: {cut}"
                    ))),
                }
            }
        }
    }

    /// Cuts the file back to the last good record, durably.
    fn repair(&mut self) -> std::io::Result<()> {
        self.file.truncate(self.end)?;
        self.dirty = false;
        Ok(())
    }
}

/// Where appends go.
enum Handle {
    Open(Tail<File>),
    /// A compaction replaced the log but reopening it failed: the old handle points at the
    /// unlinked file, where records would be lost, so it is gone; the next append reopens the
    /// log (`end` bytes of good records) or is refused.
    Reopen {
        end: u64,
    },
}

/// The open log.
pub struct FeedbackLog {
    path: PathBuf,
    handle: Handle,
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
        let end = file.seek(SeekFrom::End(0))?;
        let records = replay.records.len() as u64;
        Ok((
            Self {
                path: path.to_path_buf(),
                handle: Handle::Open(Tail::new(file, end, false)),
                records,
            },
            replay,
        ))
    }

    /// Appends one record and fsyncs it; returns its sequence number (0-based). An error means
    /// the record was not written (and will not be replayed).
    pub fn append(&mut self, record: &Record) -> Result<u64, LogError> {
        let frame = record.encode();
        // One write: a crash leaves the whole frame, a prefix of it (torn, dropped at
        // replay) or nothing.
        self.tail()?.append(&frame)?;
        self.records += 1;
        Ok(self.records - 1)
    }

    /// Whether appends go to the log now (false while a reopen after compaction is pending).
    pub fn is_open(&self) -> bool {
        matches!(self.handle, Handle::Open(_))
    }

    /// The open tail, reopening the log first if a compaction left it closed.
    fn tail(&mut self) -> Result<&mut Tail<File>, LogError> {
        if let Handle::Reopen { end } = self.handle {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| {
                    LogError::Unavailable(format!(
                        "reopening `{}` after compaction failed: {e}",
                        self.path.display()
                    ))
                })?;
            // Dirty: cut to the known end before the first write, whatever the file holds.
            self.handle = Handle::Open(Tail::new(file, end, true));
        }
        match &mut self.handle {
            Handle::Open(tail) => Ok(tail),
            Handle::Reopen { .. } => unreachable!("reopened above, this is a bug"),
        }
    }

    /// Length of the good records in the log file.
    fn end(&self) -> u64 {
        match &self.handle {
            Handle::Open(tail) => tail.end(),
            Handle::Reopen { end } => *end,
        }
    }

    /// Records in the log.
    pub fn len(&self) -> u64 {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Rewrites the log without any record of `user`, then appends a `Forget` tombstone (so
    /// replay also drops the user's training history). Returns how many records of the user
    /// were removed. Durable as [`Self::rewrite`] describes.
    pub fn forget(&mut self, user: UserHash) -> Result<u64, LogError> {
        self.rewrite(|r| r.user() != user, Some(Record::Forget { user }))
    }

    /// Retention: rewrites the log without the feedback older than `cutoff_ms` (Unix ms).
    /// `Forget` tombstones stay: they also erase training histories on replay. Returns how
    /// many records were removed.
    pub fn purge_before(&mut self, cutoff_ms: i64) -> Result<u64, LogError> {
        if self.records == 0 {
            return Ok(0);
        }
        self.rewrite(
            |r| match r {
                Record::Feedback { timestamp_ms, .. } => *timestamp_ms >= cutoff_ms,
                Record::Forget { .. } => true,
            },
            None,
        )
    }

    /// Rewrites the log with the records `keep` keeps, then `append`: write to a temporary
    /// file, fsync it, rename over the log, fsync the directory, so a crash leaves the old or
    /// the new log, never a mix. Returns how many records were removed.
    ///
    /// Once the rename is done the rewrite is durable, whatever follows: if reopening the new
    /// log fails, appends are refused until a reopen succeeds (never written to the old,
    /// unlinked file).
    fn rewrite(
        &mut self,
        keep: impl Fn(&Record) -> bool,
        append: Option<Record>,
    ) -> Result<u64, LogError> {
        let mut bytes = std::fs::read(&self.path).map_err(LogError::Compact)?;
        // Only the good records: bytes after them are a partial record awaiting its cut.
        bytes.truncate(self.end() as usize);
        let (records, _) = parse(&bytes);
        let before = records.len();
        let kept: Vec<Record> = records.into_iter().filter(|r| keep(r)).collect();
        let removed = (before - kept.len()) as u64;
        if removed == 0 && append.is_none() {
            return Ok(0);
        }
        let tmp = self.path.with_extension("compact.tmp");
        let mut buf = Vec::with_capacity(bytes.len());
        buf.extend_from_slice(MAGIC);
        for r in kept.iter().chain(append.iter()) {
            buf.extend_from_slice(&r.encode());
        }
        let written = (|| {
            let mut out = File::create(&tmp)?;
            out.write_all(&buf)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            // The old log is untouched; don't leave a partial copy of it behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(LogError::Compact(e));
        }
        self.records = (kept.len() + append.iter().count()) as u64;
        // The old handle points at the unlinked file from here on: never write through it.
        self.handle = Handle::Reopen {
            end: buf.len() as u64,
        };
        let synced = sync_dir(parent(&self.path));
        if let Err(e) = self.tail() {
            tracing::error!(error = %e, "feedback log not reopened after compaction; refusing feedback until it is");
        }
        // Without the directory fsync the rename may not survive a crash: not acknowledged
        // (a retry compacts again, finding nothing more to remove).
        synced.map_err(LogError::Compact)?;
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
    fn retention_removes_only_feedback_older_than_the_cutoff_and_keeps_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        let (mut log, _) = FeedbackLog::open(&path).unwrap();
        // fb(u, item) is at 1_700_000_000_000 + item ms: items 1..=3 are old, 10 and 11 new.
        for r in [fb(1, 1), fb(2, 2), fb(1, 10), fb(3, 3), fb(2, 11)] {
            log.append(&r).unwrap();
        }
        log.forget(UserHash([3; 16])).unwrap();
        let cutoff = 1_700_000_000_000 + 5;
        assert_eq!(log.purge_before(cutoff).unwrap(), 2, "fb(1,1) and fb(2,2)");
        assert_eq!(
            log.purge_before(cutoff).unwrap(),
            0,
            "nothing older is left"
        );
        log.append(&fb(4, 12)).unwrap();
        let replay = read_all(&path).unwrap();
        assert_eq!(
            replay.records,
            vec![
                fb(1, 10),
                fb(2, 11),
                Record::Forget {
                    user: UserHash([3; 16])
                },
                fb(4, 12)
            ]
        );
        assert_eq!(log.len(), 4);
        let (_, reopened) = FeedbackLog::open(&path).unwrap();
        assert_eq!(
            reopened.records, replay.records,
            "the purge survives a restart"
        );
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

    /// A file in memory with a size limit (a full disk, `RLIMIT_FSIZE`: a write past it is
    /// cut short there and fails) and fsync / truncate failures on cue.
    struct FakeFile {
        data: Vec<u8>,
        limit: Option<usize>,
        fail_syncs: usize,
        fail_truncates: usize,
    }

    impl FakeFile {
        fn new() -> Self {
            Self {
                data: MAGIC.to_vec(),
                limit: None,
                fail_syncs: 0,
                fail_truncates: 0,
            }
        }
    }

    impl LogFile for FakeFile {
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let offset = offset as usize;
            let room = self.limit.map_or(usize::MAX, |l| l.saturating_sub(offset));
            let n = buf.len().min(room);
            if self.data.len() < offset + n {
                self.data.resize(offset + n, 0);
            }
            self.data[offset..offset + n].copy_from_slice(&buf[..n]);
            if n < buf.len() {
                Err(std::io::Error::from_raw_os_error(27)) // EFBIG
            } else {
                Ok(())
            }
        }

        fn sync_data(&mut self) -> std::io::Result<()> {
            if self.fail_syncs > 0 {
                self.fail_syncs -= 1;
                return Err(std::io::Error::other("injected fsync failure"));
            }
            Ok(())
        }

        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            if self.fail_truncates > 0 {
                self.fail_truncates -= 1;
                return Err(std::io::Error::other("injected truncate failure"));
            }
            self.data.truncate(len as usize);
            Ok(())
        }
    }

    fn fake_tail() -> Tail<FakeFile> {
        Tail::new(FakeFile::new(), MAGIC.len() as u64, false)
    }

    /// What replay would see in the fake file: the records, and whether every byte is part of
    /// one (no torn tail for replay to stop at).
    fn replayed(tail: &Tail<FakeFile>) -> (Vec<Record>, bool) {
        let (records, good) = parse(&tail.file.data);
        (records, good == tail.file.data.len())
    }

    #[test]
    fn a_write_cut_short_by_a_full_disk_is_cut_off_and_later_records_replay() {
        let mut tail = fake_tail();
        for i in 0..3 {
            tail.append(&fb(1, i).encode()).unwrap();
        }
        let end = tail.file.data.len();
        tail.file.limit = Some(end + 20);
        let err = tail.append(&fb(1, 3).encode()).unwrap_err();
        assert!(matches!(err, LogError::Write(_)), "{err:?}");
        assert_eq!(tail.file.data.len(), end, "the partial record was cut off");
        // The disk has room again: the next record follows the last good one.
        tail.file.limit = None;
        tail.append(&fb(1, 4).encode()).unwrap();
        assert_eq!(
            replayed(&tail),
            (vec![fb(1, 0), fb(1, 1), fb(1, 2), fb(1, 4)], true)
        );
    }

    #[test]
    fn a_failed_fsync_is_cut_off_too() {
        let mut tail = fake_tail();
        tail.append(&fb(1, 0).encode()).unwrap();
        tail.file.fail_syncs = 1;
        assert!(matches!(
            tail.append(&fb(1, 1).encode()),
            Err(LogError::Write(_))
        ));
        tail.append(&fb(1, 2).encode()).unwrap();
        assert_eq!(replayed(&tail), (vec![fb(1, 0), fb(1, 2)], true));
    }

    #[test]
    fn while_the_cut_fails_nothing_is_written_and_the_next_success_cuts_first() {
        let mut tail = fake_tail();
        tail.append(&fb(1, 0).encode()).unwrap();
        tail.file.limit = Some(tail.file.data.len() + 10);
        tail.file.fail_truncates = 2;
        assert!(matches!(
            tail.append(&fb(1, 1).encode()),
            Err(LogError::Unavailable(_))
        ));
        let torn = tail.file.data.clone();
        tail.file.limit = None;
        assert!(matches!(
            tail.append(&fb(1, 2).encode()),
            Err(LogError::Unavailable(_))
        ));
        assert_eq!(
            tail.file.data, torn,
            "nothing written after a partial record"
        );
        tail.append(&fb(1, 3).encode()).unwrap();
        assert_eq!(replayed(&tail), (vec![fb(1, 0), fb(1, 3)], true));
    }

    #[test]
    fn under_random_failures_replay_sees_exactly_the_acknowledged_records() {
        let mut tail = fake_tail();
        let mut acked = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for i in 0..3000 {
            let len = tail.file.data.len();
            tail.file.limit = match rand(4) {
                0 => Some(len + rand(80) as usize),
                _ => None,
            };
            tail.file.fail_syncs = usize::from(rand(8) == 0);
            tail.file.fail_truncates = rand(6).saturating_sub(3) as usize;
            let r = fb((i % 7) as u8, i);
            if tail.append(&r.encode()).is_ok() {
                acked.push(r);
            }
        }
        assert!(acked.len() > 1000 && acked.len() < 3000, "{}", acked.len());
        (
            tail.file.limit,
            tail.file.fail_syncs,
            tail.file.fail_truncates,
        ) = (None, 0, 0);
        let last = fb(9, 9999);
        tail.append(&last.encode()).unwrap();
        acked.push(last);
        assert_eq!(replayed(&tail), (acked, true));
    }

    #[test]
    fn after_a_failed_reopen_writes_are_refused_then_go_to_the_new_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        let (mut log, _) = FeedbackLog::open(&path).unwrap();
        log.append(&fb(1, 10)).unwrap();
        log.append(&fb(2, 20)).unwrap();
        assert_eq!(log.forget(UserHash([1; 16])).unwrap(), 1);
        assert!(log.is_open());
        // What a compaction whose reopen failed leaves: no handle (the old one points at the
        // unlinked file), and for now nothing openable at the log's path.
        log.handle = Handle::Reopen { end: log.end() };
        let aside = dir.path().join("aside");
        std::fs::rename(&path, &aside).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = log.append(&fb(2, 21)).unwrap_err();
        assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
        assert!(!log.is_open());
        std::fs::remove_dir(&path).unwrap();
        std::fs::rename(&aside, &path).unwrap();
        assert_eq!(log.append(&fb(2, 22)).unwrap(), 2);
        assert!(log.is_open());
        drop(log);
        assert_eq!(
            read_all(&path).unwrap().records,
            vec![
                fb(2, 20),
                Record::Forget {
                    user: UserHash([1; 16])
                },
                fb(2, 22)
            ]
        );
    }

    #[test]
    fn forget_ignores_a_partial_record_awaiting_its_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback.log");
        let (mut log, _) = FeedbackLog::open(&path).unwrap();
        log.append(&fb(1, 10)).unwrap();
        log.append(&fb(2, 20)).unwrap();
        // A whole but unacknowledged record after the good end (fsync failed, cut failed).
        {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&fb(2, 21).encode()).unwrap();
        }
        assert_eq!(log.forget(UserHash([1; 16])).unwrap(), 1);
        drop(log);
        assert_eq!(
            read_all(&path).unwrap().records,
            vec![
                fb(2, 20),
                Record::Forget {
                    user: UserHash([1; 16])
                }
            ]
        );
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
