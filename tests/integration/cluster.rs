//! PostgreSQL clusters of a test's own (`initdb` in a temporary directory,
//! a free port on 127.0.0.1), for tests that must stop, freeze or restart
//! the database under a running service — which the shared server the
//! other tests use cannot be.
//!
//! Every process started here is stopped by its process id: the server by
//! `pg_ctl stop` (which signals the postmaster's pid) and, should that
//! fail, by SIGKILL to the pid in `postmaster.pid`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One PostgreSQL cluster; stopped and removed when dropped.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

/// The directory of PostgreSQL's server binaries: `EVENTVAULT_PG_BIN`, or
/// the newest `/usr/lib/postgresql/<version>/bin`.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("EVENTVAULT_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries in /usr/lib/postgresql (or set EVENTVAULT_PG_BIN)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("initdb under /usr/lib/postgresql/*/bin (or set EVENTVAULT_PG_BIN)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A free TCP port on 127.0.0.1 (bound and released: another process may
/// take it meanwhile, which the start would then report).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PgCluster {
    /// Runs one of PostgreSQL's programs as the owner of the cluster
    /// (`postgres` when the tests run as root: the server refuses root).
    fn program(&self, name: &str) -> Command {
        program(&self.bin, name)
    }

    /// `initdb` and start, with trust authentication on 127.0.0.1 only.
    pub async fn start() -> PgCluster {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("evpg")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown the cluster directory to postgres");
        }
        let cluster = PgCluster {
            dir,
            port: free_port(),
            bin,
        };
        let out = cluster
            .program("initdb")
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(cluster.data())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.restart().await;
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The superuser's URL of the cluster's `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the stopped server on its port and waits until it accepts
    /// connections (`pg_ctl start -w`).
    pub async fn restart(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .program("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-o", &options])
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// Stops the server (fast shutdown: sessions are ended, connections
    /// refused from then on) and waits until it has stopped.
    pub async fn stop(&self) {
        let out = self
            .program("pg_ctl")
            .args(["stop", "-w", "-m", "fast", "-D"])
            .arg(self.data())
            .output()
            .expect("run pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The postmaster's pid, from `postmaster.pid` (`None`: not running).
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The postmaster and every process it started (its backends).
    fn server_pids(&self) -> Vec<u32> {
        let Some(postmaster) = self.postmaster_pid() else {
            return vec![];
        };
        let mut pids = vec![postmaster];
        pids.extend(children_of(postmaster));
        pids
    }

    /// Freezes the server (SIGSTOP to the postmaster and its backends): it
    /// neither answers nor closes connections, as a machine that hangs.
    pub fn freeze(&self) {
        self.signal_server("STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal_server("CONT");
    }

    /// Signals the postmaster (which must get it) and its backends.
    fn signal_server(&self, name: &str) {
        let pids = self.server_pids();
        assert!(
            !pids.is_empty() && signal(&pids[..1], name),
            "kill -{name} the postmaster"
        );
        signal(&pids[1..], name);
    }
}

fn program(bin: &Path, name: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(name));
        c
    } else {
        Command::new(bin.join(name))
    }
}

/// The pids whose parent is `parent` (from `/proc`).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid …`; comm may hold spaces and parens.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Sends signal `name` to `pids`; whether every one of them got it (a
/// backend may have exited since it was listed).
fn signal(pids: &[u32], name: &str) -> bool {
    pids.is_empty()
        || Command::new("kill")
            .arg(format!("-{name}"))
            .args(pids.iter().map(u32::to_string))
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A frozen server would not stop.
        signal(&self.server_pids(), "CONT");
        let stopped = self
            .program("pg_ctl")
            .args(["stop", "-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .output()
            .is_ok_and(|o| o.status.success());
        if !stopped && let Some(pid) = self.postmaster_pid() {
            signal(&[pid], "KILL");
        }
    }
}
