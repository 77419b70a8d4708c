//! The unit host process as the library drives it: deadlines enforced by killing the process,
//! restarts after a kill or a crash, modules sent once, the same bytes as in-process runs.

use std::path::Path;
use std::time::{Duration, Instant};

use coordinator_free::sandbox::{
    HostedModule, Limits, Metering, Sandbox, SandboxConfig, UnitError, UnitHost, UnitHostCommand,
    UnitRequest,
};

fn host() -> UnitHost {
    UnitHost::new(UnitHostCommand {
        program: env!("CARGO_BIN_EXE_worker").into(),
        args: vec!["unit-host".into(), "--no-cache".into()],
    })
}

fn request(input: &[u8], timeout: Duration) -> UnitRequest {
    let mut r = UnitRequest::new(input.to_vec());
    r.limits = Limits {
        timeout,
        ..Limits::default()
    };
    r
}

fn alive(pid: u32) -> bool {
    // A killed child is reaped by the parent, so its /proc entry goes away.
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn deadline_kills_the_host_and_the_next_unit_gets_a_new_one() {
    let mut host = host();
    let faults = HostedModule::new(example_artifacts::FAULTS_BYTES.to_vec(), Metering::Off);
    let ok = host.run(&faults, request(br#"{"ok":true}"#, Duration::from_secs(30)));
    assert_eq!(ok.result, Ok(br#"{"ok":true}"#.to_vec()));
    let pid = host.pid().expect("a host runs");

    let started = Instant::now();
    let spin = host.run(
        &faults,
        request(br#"{"spin":true}"#, Duration::from_millis(300)),
    );
    assert_eq!(
        spin.result,
        Err(UnitError::Timeout {
            limit: Duration::from_millis(300)
        })
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(host.pid(), None, "the spinning host was killed");
    assert!(!alive(pid), "process {pid} is gone");

    let again = host.run(&faults, request(br#"{"ok":true}"#, Duration::from_secs(30)));
    assert_eq!(again.result, Ok(br#"{"ok":true}"#.to_vec()));
    assert_ne!(host.pid(), Some(pid), "a fresh host serves the next unit");
}

#[test]
fn a_crashed_host_costs_one_unit_as_a_host_failure() {
    let mut host = host();
    let echo = HostedModule::new(example_artifacts::ECHO_BYTES.to_vec(), Metering::Off);
    assert_eq!(
        host.run(&echo, request(b"a", Duration::from_secs(30)))
            .result,
        Ok(b"a".to_vec())
    );
    let pid = host.pid().expect("a host runs");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let lost = host.run(&echo, request(b"b", Duration::from_secs(30)));
    match lost.result {
        Err(e @ UnitError::Host { .. }) => {
            assert_eq!(
                e.class(),
                coordinator_free::sandbox::OutcomeClass::HostFailure
            )
        }
        other => panic!("expected a host failure, got {other:?}"),
    }
    assert_eq!(
        host.run(&echo, request(b"c", Duration::from_secs(30)))
            .result,
        Ok(b"c".to_vec())
    );
}

#[test]
fn results_match_the_in_process_sandbox_across_modules() {
    let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
    let executor = coordinator_free::sandbox::Executor::new(sandbox.clone(), 1, 1).unwrap();
    let mut host = host();
    let cases: [(&[u8], &[u8]); 4] = [
        (example_artifacts::PI_BYTES, br#"{"samples":200000,"seed":9}"#),
        (
            example_artifacts::SIR_BYTES,
            br#"{"beta":0.3,"gamma":0.1,"population":10000.0,"initial_infected":1.0,"days":100,"steps_per_day":4}"#,
        ),
        (example_artifacts::FAULTS_BYTES, br#"{"panic":"boom"}"#),
        (example_artifacts::PI_BYTES, br#"{"samples":1000,"seed":1}"#),
    ];
    // Twice round: the second time the host already holds every module.
    for _ in 0..2 {
        for (wasm, input) in cases {
            let hosted = HostedModule::new(wasm.to_vec(), Metering::Off);
            let remote = host.run(&hosted, request(input, Duration::from_secs(30)));
            let local = executor.run(
                sandbox.prepare(wasm, Metering::Off).unwrap(),
                request(input, Duration::from_secs(30)),
            );
            assert_eq!(remote.result, local.result);
            assert_eq!(remote.logs, local.logs);
        }
    }
    let refused = host.run(
        &HostedModule::new(b"\0asm\x01\0\0\0\xff".to_vec(), Metering::Off),
        request(b"", Duration::from_secs(30)),
    );
    assert!(matches!(refused.result, Err(UnitError::BadModule { .. })));
}

#[test]
fn a_pool_of_unit_hosts_runs_units_in_parallel_and_survives_timeouts() {
    let command = UnitHostCommand {
        program: env!("CARGO_BIN_EXE_worker").into(),
        args: vec!["unit-host".into(), "--no-cache".into()],
    };
    let pool = coordinator_free::sandbox::Executor::unit_hosts(&command, 2, 16).unwrap();
    let echo = std::sync::Arc::new(HostedModule::new(
        example_artifacts::ECHO_BYTES.to_vec(),
        Metering::Off,
    ));
    let faults = std::sync::Arc::new(HostedModule::new(
        example_artifacts::FAULTS_BYTES.to_vec(),
        Metering::Off,
    ));
    let (send, receive) = std::sync::mpsc::channel();
    for i in 0..12u32 {
        let send = send.clone();
        let (module, input, timeout) = if i % 4 == 3 {
            (
                faults.clone(),
                br#"{"spin":true}"#.to_vec(),
                Duration::from_millis(200),
            )
        } else {
            (
                echo.clone(),
                i.to_le_bytes().to_vec(),
                Duration::from_secs(30),
            )
        };
        pool.try_submit(module, request(&input, timeout), move |report| {
            let _ = send.send((i, report));
        })
        .expect("the queue has room for all twelve");
    }
    drop(send);
    let mut seen = 0;
    while let Ok((i, report)) = receive.recv_timeout(Duration::from_secs(60)) {
        seen += 1;
        if i % 4 == 3 {
            assert!(
                matches!(report.result, Err(UnitError::Timeout { .. })),
                "{i}"
            );
        } else {
            assert_eq!(report.result, Ok(i.to_le_bytes().to_vec()), "{i}");
        }
    }
    assert_eq!(seen, 12);
}

#[test]
fn a_unit_host_can_yield_the_cpu_to_the_volunteer() {
    let mut host = UnitHost::new(UnitHostCommand {
        program: env!("CARGO_BIN_EXE_worker").into(),
        args: vec![
            "unit-host".into(),
            "--no-cache".into(),
            "--nice".into(),
            "15".into(),
        ],
    });
    let echo = HostedModule::new(example_artifacts::ECHO_BYTES.to_vec(), Metering::Off);
    assert_eq!(
        host.run(&echo, request(b"x", Duration::from_secs(30)))
            .result,
        Ok(b"x".to_vec())
    );
    let pid = host.pid().expect("a host runs");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Field 19 of /proc/PID/stat is the niceness; the command name (field 2) has no spaces here.
    let nice: i32 = stat.split_whitespace().nth(18).unwrap().parse().unwrap();
    assert_eq!(nice, 15);
}
