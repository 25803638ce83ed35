//! User ids are personal data: everything past the gRPC handler (memory, the feedback log,
//! logs, spans) knows a user only by a keyed hash (HMAC-SHA256 under a secret key, truncated
//! to 128 bits). Without the key the hash cannot be linked back to an id by trying ids.

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The secret key of the user-id hash.
#[derive(Clone)]
pub struct UserKey(Vec<u8>);

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserKey(..)")
    }
}

/// A keyed hash of a user id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserHash(pub [u8; 16]);

impl std::fmt::Display for UserHash {
    /// The first 8 bytes in hex: enough to correlate log lines, useless without the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for UserHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserHash({self})")
    }
}

/// Smallest accepted key: 128 bits.
pub const MIN_KEY_BYTES: usize = 16;

impl UserKey {
    pub fn from_bytes(key: Vec<u8>) -> Self {
        Self(key)
    }

    /// Reads the key file (every byte is the key, at least [`MIN_KEY_BYTES`]); never creates it.
    /// A store shared by replicas reads the one key they all mount.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let key = std::fs::read(path)?;
        if key.len() < MIN_KEY_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "user id key `{}` has {} bytes, at least {MIN_KEY_BYTES} are required",
                    path.display(),
                    key.len()
                ),
            ));
        }
        Ok(Self(key))
    }

    /// Reads the key file, or creates it (32 random bytes, mode 0600) when missing: the key
    /// must survive restarts because the feedback log stores hashes.
    ///
    /// Created atomically: written to a temporary file, fsync'd, renamed into place, directory
    /// fsync'd. A crash (or a full disk) mid-way leaves no key file or a whole one, never a
    /// short one that would refuse every later start or, worse, hash with a different key.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        if path.exists() {
            return Self::load(path);
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir)?;
        let mut key = vec![0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        // A temporary file left by an earlier crash is not the key: start it afresh.
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            crate::feedback::sync_dir(dir)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Self(key))
    }

    /// The pseudonym of user `user_id` of `tenant`: tenants' user ids are separate spaces, so
    /// the same id in two tenants is two users. The default tenant's pseudonym is
    /// [`Self::hash`] of the id alone, as before tenants were keyed, so logs and training
    /// users from then stay theirs; the others hash the tenant too (a longer, differently
    /// framed input, so no id of one space collides with another's by construction).
    pub fn hash_for(&self, tenant: &str, user_id: i64) -> UserHash {
        if tenant == marquee_core::tenant::DEFAULT_TENANT {
            return self.hash(user_id);
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length, this is a bug");
        mac.update(b"tenant\0");
        mac.update(&(tenant.len() as u64).to_le_bytes());
        mac.update(tenant.as_bytes());
        mac.update(&user_id.to_le_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        UserHash(out)
    }

    /// The keyed hash of a user id (the default tenant's pseudonym).
    pub fn hash(&self, user_id: i64) -> UserHash {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length, this is a bug");
        mac.update(&user_id.to_le_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        UserHash(out)
    }

    /// A fingerprint of the key (the MAC of a fixed label: 8-byte ids never collide with it,
    /// and it reveals nothing of the key): a shared store records the first key that wrote to
    /// it, so a replica started with another key is refused instead of splitting users.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length, this is a bug");
        mac.update(b"marquee user-id key fingerprint");
        mac.finalize().into_bytes()[..16].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_keyed_and_stable() {
        let a = UserKey::from_bytes(vec![1; 32]);
        let b = UserKey::from_bytes(vec![2; 32]);
        assert_eq!(a.hash(42), a.hash(42));
        assert_ne!(a.hash(42), a.hash(43));
        assert_ne!(a.hash(42), b.hash(42), "another key gives other hashes");
        assert!(!a.hash(42).to_string().contains("42"));
        assert_eq!(a.hash(42).to_string().len(), 16);
    }

    #[test]
    fn tenants_have_separate_user_spaces_and_the_default_one_keeps_its_hashes() {
        let k = UserKey::from_bytes(vec![1; 32]);
        assert_eq!(k.hash_for("default", 42), k.hash(42));
        assert_ne!(k.hash_for("acme", 42), k.hash_for("globex", 42));
        assert_ne!(k.hash_for("acme", 42), k.hash(42));
        assert_eq!(k.hash_for("acme", 42), k.hash_for("acme", 42));
        // Length-framed: ("ab", id) and ("a", id') cannot meet by shifting bytes around.
        assert_ne!(k.hash_for("ab", 1), k.hash_for("a", 1));
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/user.key");
        let k1 = UserKey::load_or_create(&path).unwrap();
        let k2 = UserKey::load_or_create(&path).unwrap();
        assert_eq!(k1.hash(7), k2.hash(7));
        std::fs::write(&path, b"short").unwrap();
        assert!(UserKey::load_or_create(&path).is_err());
    }

    #[test]
    fn key_file_is_created_whole_with_no_temporary_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user_id.key");
        // A temporary file left by a crash mid-creation is not the key, and is replaced.
        std::fs::write(dir.path().join("user_id.key.tmp"), b"torn").unwrap();
        let key = UserKey::load_or_create(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
        assert!(!dir.path().join("user_id.key.tmp").exists());
        assert_eq!(UserKey::load_or_create(&path).unwrap().hash(1), key.hash(1));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
