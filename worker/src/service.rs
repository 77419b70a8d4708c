//! `worker service install [--user]` and `worker service uninstall [--user]`: a systemd unit that
//! runs `worker run` at boot (system) or login (user), hardened, and what to type next.
//!
//! The system unit runs under a user systemd makes for it (`DynamicUser`), with its data in
//! `/var/lib/coordinator-free` and its settings in `/etc/coordinator-free/worker.toml`; the
//! user unit runs as the user, with the same data directory and config file as `worker run`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};

use crate::Failure;

/// The unit's name.
const UNIT: &str = "coordinator-free-worker.service";

#[derive(Args)]
pub struct ServiceArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Write the systemd unit and say how to start it.
    Install(Where),
    /// Remove the systemd unit (stop and disable it first, as printed).
    Uninstall(Where),
}

#[derive(Args)]
struct Where {
    /// A unit of your own user (runs while you are logged in, or always with lingering)
    /// instead of a system unit (needs root).
    #[arg(long)]
    user: bool,
    /// Print the unit instead of writing it.
    #[arg(long)]
    print: bool,
}

pub fn run(args: ServiceArgs) -> Result<ExitCode, Failure> {
    match args.action {
        Action::Install(at) => install(&at),
        Action::Uninstall(at) => uninstall(&at),
    }
}

fn install(at: &Where) -> Result<ExitCode, Failure> {
    let worker = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("cannot tell where this worker binary is")
        .map_err(Failure::usage)?;
    let text = if at.user {
        let data = crate::data_dir(None)
            .ok_or_else(|| Failure::usage(anyhow!("no data directory: HOME is not set")))?;
        // The sandbox makes it writable only if it exists when the service starts.
        if !at.print {
            std::fs::create_dir_all(&data)
                .with_context(|| format!("cannot create {}", data.display()))
                .map_err(Failure::usage)?;
        }
        user_unit(&worker, &data)
    } else {
        system_unit(&worker)
    };
    if at.print {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let path = unit_path(at.user)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {}", dir.display()))
            .map_err(Failure::usage)?;
    }
    std::fs::write(&path, text)
        .with_context(|| format!("cannot write {}", path.display()))
        .map_err(Failure::usage)?;
    let ctl = if at.user {
        "systemctl --user"
    } else {
        "systemctl"
    };
    println!("wrote {}", path.display());
    println!("start it now and at every boot:  {ctl} daemon-reload && {ctl} enable --now {UNIT}");
    if at.user {
        println!("keep it running when you are logged out:  loginctl enable-linger \"$USER\"");
        println!("settings: {}", config_hint());
    } else {
        println!("settings: /etc/coordinator-free/worker.toml (read again when it changes)");
        println!(
            "status:   sudo worker status --data-dir /var/lib/coordinator-free   (logs: journalctl -u {UNIT})"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn uninstall(at: &Where) -> Result<ExitCode, Failure> {
    let path = unit_path(at.user)?;
    let ctl = if at.user {
        "systemctl --user"
    } else {
        "systemctl"
    };
    if at.print {
        println!("{}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => println!("removed {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no unit at {}", path.display());
        }
        Err(e) => {
            return Err(Failure::usage(
                anyhow!(e).context(format!("cannot remove {}", path.display())),
            ));
        }
    }
    println!("if it was running:  {ctl} disable --now {UNIT} && {ctl} daemon-reload");
    Ok(ExitCode::SUCCESS)
}

fn config_hint() -> String {
    match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => format!("{}/coordinator-free/worker.toml", Path::new(&dir).display()),
        None => "~/.config/coordinator-free/worker.toml".into(),
    }
}

/// Where the unit goes: `/etc/systemd/system`, or the user's systemd directory.
fn unit_path(user: bool) -> Result<PathBuf, Failure> {
    if !user {
        return Ok(PathBuf::from("/etc/systemd/system").join(UNIT));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .ok_or_else(|| Failure::usage(anyhow!("HOME is not set")))?;
    Ok(config.join("systemd/user").join(UNIT))
}

/// The lines both units share: how the worker runs, and the sandbox around it.
fn common(out: &mut String, worker: &Path, data: &str) {
    let _ = writeln!(
        out,
        "[Unit]\nDescription=coordinator-free worker: donate this machine's idle CPU to science\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\nType=simple"
    );
    let _ = writeln!(
        out,
        "ExecStart={} run --data-dir {data}",
        quoted(&worker.display().to_string())
    );
    // SIGTERM is a clean stop (units continued first, the ledger written); a crash is retried.
    let _ = writeln!(
        out,
        "Restart=on-failure\nRestartSec=10\nTimeoutStopSec=30\nExecReload=/bin/kill -HUP $MAINPID"
    );
    // Below the volunteer's own programs; unit hosts run at nice 10 on top of this.
    let _ = writeln!(out, "Nice=5\nIOSchedulingClass=idle");
    let _ = writeln!(
        out,
        "NoNewPrivileges=yes\nProtectSystem=strict\nPrivateTmp=yes\nPrivateDevices=no\nProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictSUIDSGID=yes\nLockPersonality=yes\nRestrictRealtime=yes\nRestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK"
    );
}

fn system_unit(worker: &Path) -> String {
    let mut out = String::new();
    common(&mut out, worker, "/var/lib/coordinator-free");
    // A user made by systemd for this service alone: the worker owns nothing else.
    let _ = writeln!(
        out,
        "DynamicUser=yes\nStateDirectory=coordinator-free\nStateDirectoryMode=0700\nConfigurationDirectory=coordinator-free\nEnvironment=XDG_CONFIG_HOME=/etc\nProtectHome=yes\n\n[Install]\nWantedBy=multi-user.target"
    );
    out
}

fn user_unit(worker: &Path, data: &Path) -> String {
    let mut out = String::new();
    common(&mut out, worker, &quoted(&data.display().to_string()));
    // The data directory is the one place it writes; the home directory is otherwise
    // read-only to it.
    let _ = writeln!(
        out,
        "ProtectHome=read-only\nReadWritePaths={}\n\n[Install]\nWantedBy=default.target",
        quoted(&data.display().to_string())
    );
    out
}

/// A path as systemd reads it in `ExecStart=`: quoted when it holds spaces.
fn quoted(path: &str) -> String {
    if path.contains(char::is_whitespace) {
        format!("\"{}\"", path.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        path.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_unit_is_hardened_and_keeps_its_data_in_a_state_directory() {
        let unit = system_unit(Path::new("/usr/local/bin/worker"));
        for line in [
            "ExecStart=/usr/local/bin/worker run --data-dir /var/lib/coordinator-free",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "DynamicUser=yes",
            "StateDirectory=coordinator-free",
            "Nice=5",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} in\n{unit}");
        }
    }

    #[test]
    fn the_user_unit_writes_only_its_data_directory() {
        let unit = user_unit(
            Path::new("/home/a b/.cargo/bin/worker"),
            Path::new("/home/a b/.local/share/coordinator-free"),
        );
        assert!(
            unit.contains(
                "ExecStart=\"/home/a b/.cargo/bin/worker\" run --data-dir \"/home/a b/.local/share/coordinator-free\""
            ),
            "{unit}"
        );
        assert!(unit.contains("ReadWritePaths=\"/home/a b/.local/share/coordinator-free\""));
        assert!(unit.contains("ProtectHome=read-only"));
        assert!(unit.contains("WantedBy=default.target"));
        assert!(!unit.contains("DynamicUser"));
    }
}
