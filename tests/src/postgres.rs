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
    /// With TLS: the CA that signed the server's certificate (for 127.0.0.1).
    ca_file: Option<PathBuf>,
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
        Self::create(false)
    }

    /// As [`Self::start`], with TLS on: a throwaway CA signs the server's certificate for
    /// `127.0.0.1` ([`Self::ca_file`]); plain connections are still accepted (`pg_hba` allows
    /// both), so a client is what makes TLS required.
    pub fn start_tls() -> Self {
        Self::create(true)
    }

    /// The CA certificate of a cluster started with [`Self::start_tls`].
    pub fn ca_file(&self) -> &Path {
        self.ca_file.as_deref().expect("started with start_tls")
    }

    fn create(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("marquee-pg-")
            .tempdir()
            .unwrap();
        let run_as = (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_string());
        let ca_file = tls.then(|| make_certificates(&dir.path().join("tls")));
        if let Some(user) = &run_as {
            // The cluster's folder (and the server's key in it) must belong to the user the
            // server runs as.
            let status = Command::new("chown")
                .args(["-R", &format!("{user}:"), dir.path().to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster folder failed");
        }
        let pg = Self {
            bin: bin_dir(),
            port: free_port(),
            run_as,
            dir,
            ca_file,
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
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        if self.ca_file.is_some() {
            let tls = self.dir.path().join("tls");
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                tls.join("server.crt").display(),
                tls.join("server.key").display()
            ));
        }
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

/// A CA and a server certificate for `127.0.0.1` it signed (P-256 keys, valid 2 days) in
/// `dir`, by the `openssl` command line; returns the CA certificate's path.
pub fn make_certificates(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=marquee test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&csr);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    // PostgreSQL refuses a key others can read.
    std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    dir.join("ca.crt")
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
