//! The binary in a pseudo-terminal, as an operator runs it. `spillway top` says it is
//! connecting at once, draws the fleet, and gives the terminal back as it found it (main
//! screen, cursor shown, raw mode off) whether it is stopped by SIGTERM or by Ctrl-C; without
//! a terminal, or with one of no size, it says so and exits with an error instead of
//! panicking. `spillway serve` stopped with Ctrl-C in a terminal skips the load balancer's
//! delay, and its logs there are coloured (in a file they are not: `drain.rs`).

mod common;

use common::{KillOnDrop, free_port, redis_server, sigterm};

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::pty::{Winsize, openpty};
use nix::sys::termios::{LocalFlags, tcgetattr};

/// Leave the alternate screen; show the cursor.
const LEAVE_ALTERNATE_SCREEN: &str = "\x1b[?1049l";
const SHOW_CURSOR: &str = "\x1b[?25h";

/// A Redis and a configuration naming it, in a scratch directory.
struct Fleet {
    _redis: KillOnDrop,
    config: std::path::PathBuf,
}

fn fleet(tag: &str) -> Fleet {
    let dir = std::env::temp_dir().join(format!("spillway-top-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (redis, port) = redis_server(&dir, &[]);
    let config = dir.join("spillway.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\nredis_url = \"redis://127.0.0.1:{port}\"\nkey_prefix = \"top\"\n\
             [[backends]]\nid = \"ptu-eastus\"\nurl = \"http://127.0.0.1:9\"\n\
             deployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n"
        ),
    )
    .unwrap();
    Fleet {
        _redis: redis,
        config,
    }
}

/// `spillway top` on a new pseudo-terminal of `columns` x `rows`, in a session of its own;
/// the terminal's other end, and what it prints, chunk by chunk.
struct Top {
    child: KillOnDrop,
    master: std::fs::File,
    output: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

fn top(fleet: &Fleet, columns: u16, rows: u16) -> Top {
    let config = fleet.config.to_str().unwrap().to_owned();
    in_terminal(&["top", "--config", &config], columns, rows)
}

/// `spillway <args>` on a new pseudo-terminal.
fn in_terminal(args: &[&str], columns: u16, rows: u16) -> Top {
    let size = Winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).expect("a pseudo-terminal");
    let slave: OwnedFd = pty.slave;
    let stdio = || Stdio::from(slave.try_clone().unwrap());
    let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio());
    // Its own session, with the pseudo-terminal as its controlling terminal: the only one it
    // can use, and the one whose Ctrl-C becomes its SIGINT.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = KillOnDrop(command.spawn().unwrap());
    drop(slave);
    let master = std::fs::File::from(pty.master);
    let mut reader = master.try_clone().unwrap();
    let (sender, output) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        // Ends with EIO once the child has closed its end.
        while let Ok(n @ 1..) = reader.read(&mut buffer) {
            if sender.send(buffer[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    Top {
        child,
        master,
        output,
        seen: String::new(),
    }
}

impl Top {
    /// Wait until the output so far contains `text`.
    fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.seen.contains(text) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!("{text:?} never appeared; the screen so far:\n{}", self.seen),
            }
        }
    }

    /// Wait for the exit; its status and everything printed from `from` on.
    fn exit(&mut self, from: usize) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                break status;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .output
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                // Its end of the terminal is closed: it has exited, or is about to.
                Err(mpsc::RecvTimeoutError::Disconnected) => break self.child.0.wait().unwrap(),
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(_) => panic!("spillway top did not exit; the screen:\n{}", self.seen),
            }
        };
        // The rest of what it printed, up to the end of the terminal.
        while let Ok(chunk) = self.output.recv_timeout(Duration::from_secs(5)) {
            self.seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        (status, self.seen[from..].to_owned())
    }

    /// The terminal is back in its cooked mode (line editing and echo on).
    fn cooked(&self) -> bool {
        let modes = tcgetattr(&self.master).unwrap();
        modes
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO)
    }
}

#[test]
fn sigterm_and_ctrl_c_give_the_terminal_back() {
    let fleet = fleet("restore");
    for how in ["SIGTERM", "Ctrl-C"] {
        let mut top = top(&fleet, 120, 40);
        // The screen is drawn word by word: look for words.
        top.wait_for("connecting");
        top.wait_for("ptu-eastus");
        assert!(!top.cooked(), "{how}: raw mode while it runs");
        let from = top.seen.len();
        match how {
            "SIGTERM" => sigterm(&top.child.0),
            _ => top.master.write_all(b"\x03").unwrap(),
        }
        let (status, after) = top.exit(from);
        assert!(status.success(), "{how}: {status}\n{after}");
        assert!(after.contains(LEAVE_ALTERNATE_SCREEN), "{how}: {after:?}");
        assert!(after.contains(SHOW_CURSOR), "{how}: {after:?}");
        assert!(top.cooked(), "{how}: raw mode left on");
    }
}

#[test]
fn without_a_terminal_or_its_size_it_says_so() {
    let fleet = fleet("no-tty");
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["top", "--config"])
        .arg(&fleet.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("spillway state"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let mut sizeless = top(&fleet, 0, 0);
    let (status, printed) = sizeless.exit(0);
    assert_eq!(status.code(), Some(1), "{printed}");
    assert!(printed.contains("no size"), "{printed}");
    assert!(sizeless.cooked());
}

#[test]
fn ctrl_c_in_a_terminal_stops_serve_without_the_load_balancer_delay() {
    let dir = std::env::temp_dir().join(format!("spillway-tty-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("spillway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
             [[backends]]\nid = \"ptu\"\nurl = \"http://127.0.0.1:9\"\n\
             deployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let mut serve = in_terminal(&["serve", "--config", config.to_str().unwrap()], 120, 40);
    serve.wait_for("spillway serving");
    assert!(serve.seen.contains('\x1b'), "coloured on a terminal");
    let from = serve.seen.len();
    serve.master.write_all(b"\x03").unwrap();
    let (status, after) = serve.exit(from);
    assert!(status.success(), "{status}\n{after}");
    assert!(
        after.contains("shutdown_delay_ms") && after.contains("0"),
        "{after}"
    );
    assert!(
        !after.contains("5000"),
        "the default 5 s delay is for load balancers: {after}"
    );
    assert!(after.contains("spillway stopped"), "{after}");
}
