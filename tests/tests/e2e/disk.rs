//! A full disk under the store: the host stops consuming, acks nothing it has not committed,
//! says why, and resumes cleanly when the disk has room again. Uses a real size-limited
//! filesystem (a 32 MiB tmpfs, mounted for the test; it needs root).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weir_tests::*;

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        SmallDisk::mount_with(&format!("size={size}"))
    }

    fn mount_with(options: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill it up, which needs root (CAP_SYS_ADMIN)"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.flush();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a store still open after a failed assertion must not keep it mounted.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acks_and_processing_resumes_when_space_returns() {
    let server = NatsServer::start();
    let disk = SmallDisk::mount("32m");
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    // The echo plugin, with 16 KiB payloads: each committed record takes real room.
    let plugin = plugin("hostile");
    let store_dir = disk.path().join("store");
    let config_path =
        PipelineToml::orders(&server.url(), &plugin, &store_dir).write(dir.path(), "weir.toml");
    let weir = InProcessWeir::start(&config_path, &js, "ORDERS").await;
    let payloads: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("{i:06}{}", "x".repeat(16 * 1024)).into_bytes())
        .collect();
    publish_all(&js, "orders.in.new", &payloads[..20]).await;
    wait_for("the first outputs", Duration::from_secs(30), || async {
        stream_len(&js, "ORDERS_OUT").await >= 20
    })
    .await;

    let filler = disk.fill();
    let progress = || async {
        let stream = js.get_stream("ORDERS").await.unwrap();
        let consumer = stream.consumer_info("weir").await.unwrap();
        (
            stream_len(&js, "ORDERS_OUT").await,
            consumer.ack_floor.stream_sequence,
        )
    };
    // Keep inputs coming until weir stops making progress: however much room RocksDB had
    // set aside for its log, 16 MiB more of records runs out of it.
    let mut published = 20;
    let mut settled = progress().await;
    let mut quiet_rounds = 0;
    while quiet_rounds < 3 && published < payloads.len() {
        publish_all(&js, "orders.in.new", &payloads[published..published + 20]).await;
        published += 20;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = progress().await;
        if now == settled {
            quiet_rounds += 1;
        } else {
            (settled, quiet_rounds) = (now, 0);
        }
    }
    let (outputs_then, acked_then) = settled;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (outputs_now, acked_now) = progress().await;
    println!("disk full: {outputs_now} of {published} outputs, inputs acked up to {acked_now}");
    assert!(
        (outputs_now as usize) < published,
        "the full disk stopped processing"
    );
    assert_eq!(
        (outputs_now, acked_now),
        (outputs_then, acked_then),
        "nothing is published or acked while the store cannot commit"
    );
    assert!(
        acked_now <= outputs_now,
        "no input is acked before its output is published"
    );

    std::fs::remove_file(filler).unwrap();
    wait_for("processing to resume", Duration::from_secs(60), || async {
        stream_len(&js, "ORDERS_OUT").await >= published as u64
    })
    .await;
    let stats = weir.stop_stats().await;
    assert_eq!(
        stream_len(&js, "ORDERS_OUT").await,
        published as u64,
        "every output exactly once"
    );
    assert_eq!(stats.executed, published as u64, "{stats:?}");
}

/// A store_dir weir may not create (here on a read-only filesystem, which stops root too; a
/// user without write permission is the same case to the kernel): `weir check` said "ok"
/// from the directory's mode bits while `weir run` failed. Both refuse it, naming the key.
#[test]
fn a_store_dir_weir_may_not_create_is_refused_by_check_as_by_run() {
    let server = NatsServer::start();
    let disk = SmallDisk::mount_with("ro,size=1m");
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin("orders");
    let store = disk.path().join("store");
    let config =
        PipelineToml::orders(&server.url(), &plugin, &store).write(dir.path(), "weir.toml");
    let weir = |command: &str| {
        Command::new(weir_binary())
            .args([command, "--config"])
            .arg(&config)
            .env("RUST_LOG", "off")
            .output()
            .expect("run weir")
    };

    let checked = weir("check");
    let report = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{report}");
    let store_line = report
        .lines()
        .find(|line| line.contains("store"))
        .unwrap_or_else(|| panic!("no store line:\n{report}"));
    assert!(
        store_line.contains("FAIL") && store_line.contains("not writable"),
        "{report}"
    );

    let ran = weir("run");
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert_eq!(ran.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("store_dir") && stderr.contains(&store.display().to_string()),
        "{stderr}"
    );
}
