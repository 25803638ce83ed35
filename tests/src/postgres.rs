//! A throwaway PostgreSQL cluster per test: Debian's `postgresql` binaries (installed by
//! `scripts/bootstrap.sh`), `initdb` in a temporary folder, the server on a free loopback port
//! with its socket in that folder, stopped and deleted when the value drops. `initdb` refuses
//! root, so as root the cluster runs as the `postgres` system user the package creates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The database superuser the cluster is created with (trust authentication on loopback).
pub const USER: &str = "marquee";

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The system user the server runs as, when the tests run as root.
    run_as: Option<String>,
}

/// The newest installed `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL is not installed (/usr/lib/postgresql): scripts/bootstrap.sh installs \
             Debian's `postgresql` package",
        )
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /usr/lib/postgresql/<version>/bin/pg_ctl")
        .1
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("marquee-pg-")
            .tempdir()
            .unwrap();
        let run_as = (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            // The cluster's folder must belong to the user the server runs as.
            let status = Command::new("chown")
                .args([&format!("{user}:"), dir.path().to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster folder failed");
        }
        let pg = Self {
            bin: bin_dir(),
            port: free_port(),
            run_as,
            dir,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                USER,
                "--no-sync",
            ],
        );
        pg.start_server();
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the cluster's programs as the cluster's user; panics with its output on
    /// failure.
    fn run(&self, program: &str, args: &[&str]) {
        let exe = self.bin.join(program);
        let out = match &self.run_as {
            None => Command::new(&exe).args(args).output(),
            Some(user) => {
                let mut line = shell_quote(exe.to_str().unwrap());
                for a in args {
                    line.push(' ');
                    line.push_str(&shell_quote(a));
                }
                Command::new("su")
                    .args([user.as_str(), "-s", "/bin/sh", "-c", &line])
                    .output()
            }
        }
        .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again, on the same port and data), waiting until it accepts
    /// connections.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server as an operator would for maintenance (`-m fast`: open sessions are
    /// ended, in-flight transactions rolled back).
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// The connection string the services read from `recommendation.postgres.url_file`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres",
            self.port
        )
    }

    /// Writes [`Self::url`] to a file in `dir` and returns its path.
    pub fn url_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("postgres.url");
        std::fs::write(&path, format!("{}\n", self.url())).unwrap();
        path
    }

    /// Runs `sql` through `psql` and returns its unaligned, tuples-only output, trimmed.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([&self.url(), "-X", "-v", "ON_ERROR_STOP=1", "-tAc", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// `query` for one integer.
    pub fn count(&self, sql: &str) -> i64 {
        let text = self.query(sql);
        text.parse()
            .unwrap_or_else(|_| panic!("{sql:?} gave {text:?}, not a number"))
    }

    /// Waits until the server has stopped accepting connections (after an outside stop).
    pub fn wait_down(&self, limit: Duration) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                start.elapsed() < limit,
                "PostgreSQL still up after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate: the folder is deleted next; nothing in it needs a clean shutdown.
        let data = self.data_dir();
        let pid_file = data.join("postmaster.pid");
        if pid_file.exists() {
            let exe = self.bin.join("pg_ctl");
            let line = format!(
                "{} -D {} -m immediate -w stop",
                shell_quote(exe.to_str().unwrap()),
                shell_quote(data.to_str().unwrap())
            );
            let _ = match &self.run_as {
                None => Command::new("sh").args(["-c", &line]).output(),
                Some(user) => Command::new("su")
                    .args([user.as_str(), "-s", "/bin/sh", "-c", &line])
                    .output(),
            };
        }
    }
}

/// `s` quoted for `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Hex of `bytes` as a PostgreSQL `bytea` literal: `'\x…'::bytea`.
pub fn bytea(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("'\\x{hex}'::bytea")
}
