//! The credential broker as the executor uses it: sources read from a real
//! environment, real files and real commands; rotation seen by the file
//! watch and by `reload`; failover between auth profiles driven by
//! `report`; and status that names profiles, never values.

use keyturn::app::ports::Credentials;
use keyturn::config::Config;
use keyturn::sandbox::credentials::Broker;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Parses and validates `[credentials.*]` text, then loads a broker.
fn broker(toml_text: &str) -> Broker {
    let cfg = Config::parse(toml_text).expect("config parses");
    cfg.validate().expect("config validates");
    Broker::load(&cfg.credentials)
}

/// Sets a variable only this test reads (each test uses its own names).
fn set_env(name: &str, value: &str) {
    std::env::set_var(name, value);
}

async fn value(b: &Broker, name: &str) -> (String, Vec<u8>) {
    let f = b.fetch(name).await.expect("fetch");
    (f.profile, f.value)
}

#[tokio::test]
async fn a_rotated_file_is_picked_up_by_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    // Byte-exact: the trailing newline stays.
    std::fs::write(&path, "apiVersion: v1\ntoken: old-token\n").unwrap();
    let b = Arc::new(broker(&format!(
        "[credentials.kube]\nfile = \"{}\"\n",
        path.display()
    )));
    assert_eq!(
        value(&b, "kube").await,
        (
            "default".into(),
            b"apiVersion: v1\ntoken: old-token\n".to_vec()
        )
    );

    let mut reloads = b.reloads();
    let stop = CancellationToken::new();
    let watch = b.spawn_watch(stop.clone());
    // Replace it the way a rotation does (new inode, renamed over).
    let tmp = dir.path().join("kubeconfig.new");
    std::fs::write(&tmp, "apiVersion: v1\ntoken: new-token-rotated\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();

    let new = b"apiVersion: v1\ntoken: new-token-rotated\n".to_vec();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if value(&b, "kube").await.1 == new {
                break;
            }
            reloads.changed().await.expect("broker alive");
        }
    })
    .await
    .expect("the watch re-read the rotated file");
    let values = b.values();
    assert!(values.contains(&new));
    // The old value is still masked (runs started before may print it).
    assert!(values.contains(&b"apiVersion: v1\ntoken: old-token\n".to_vec()));

    // Rewritten in place (same inode), too.
    std::fs::write(&path, "apiVersion: v1\ntoken: third\n").unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if value(&b, "kube").await.1 == b"apiVersion: v1\ntoken: third\n" {
                break;
            }
            reloads.changed().await.expect("broker alive");
        }
    })
    .await
    .expect("the watch re-read the rewritten file");

    stop.cancel();
    watch.await.unwrap();
}

#[tokio::test]
async fn reload_picks_up_a_changed_environment_variable() {
    set_env("KT_CRED_TEST_RELOAD", "first-value\n");
    let b = broker("[credentials.gh]\nenv = \"KT_CRED_TEST_RELOAD\"\n");
    // Environment values lose their trailing newline.
    assert_eq!(value(&b, "gh").await.1, b"first-value");
    set_env("KT_CRED_TEST_RELOAD", "second-value");
    assert_eq!(value(&b, "gh").await.1, b"first-value", "read at load only");
    b.reload().await;
    assert_eq!(value(&b, "gh").await.1, b"second-value");
    assert!(b.values().contains(&b"second-value".to_vec()));
}

#[tokio::test]
async fn a_command_source_gives_its_stdout_and_a_failing_one_fails_closed() {
    let b = broker(
        r#"
        [credentials.vault]
        command = ["sh", "-c", "echo secret-from-command"]

        [credentials.broken]
        command = ["sh", "-c", "echo partial; echo oops >&2; exit 1"]
        "#,
    );
    assert_eq!(value(&b, "vault").await.1, b"secret-from-command");
    let e = b.fetch("broken").await.unwrap_err();
    assert!(
        e.0.contains("`broken`") && e.0.contains("no readable source"),
        "{e}"
    );
    assert!(!e.0.contains("partial"));
    let e = b.fetch("nope").await.unwrap_err();
    assert!(e.0.contains("`nope`"), "{e}");
    // A failed read holds no value for the masker either.
    assert_eq!(b.values(), vec![b"secret-from-command".to_vec()]);
}

#[tokio::test]
async fn failover_after_n_failures_and_back_after_reset() {
    set_env("KT_CRED_TEST_FO_A", "value-a");
    set_env("KT_CRED_TEST_FO_B", "value-b");
    let b = broker(
        r#"
        [credentials.api]
        fail_after = 2
        fail_exit_codes = [77]
        fail_pattern = "Unauthorized|HTTP 401"
        profiles = [
          { name = "primary", env = "KT_CRED_TEST_FO_A" },
          { name = "backup", env = "KT_CRED_TEST_FO_B" },
        ]
        "#,
    );
    assert_eq!(
        value(&b, "api").await,
        ("primary".into(), b"value-a".to_vec())
    );

    // One failure, then a success: the count starts again.
    b.report("api", "primary", Some(77), b"");
    b.report("api", "primary", Some(0), b"ok");
    b.report("api", "primary", Some(1), b"error: Unauthorized");
    assert_eq!(value(&b, "api").await.0, "primary");
    assert_eq!(b.status()[0].profiles[0].failures, 1);

    // A second consecutive failure sets it aside.
    b.report("api", "primary", Some(77), b"");
    assert_eq!(
        value(&b, "api").await,
        ("backup".into(), b"value-b".to_vec())
    );
    let st = &b.status()[0];
    assert_eq!(st.active, "backup");
    assert!(st.profiles[0].set_aside && !st.profiles[1].set_aside);

    // Other exit codes and output count as success.
    b.report("api", "backup", Some(2), b"not found");
    assert_eq!(b.status()[0].profiles[1].failures, 0);

    assert!(b.reset("api"));
    assert!(!b.reset("unknown"));
    assert_eq!(value(&b, "api").await.0, "primary");
    assert_eq!(b.status()[0].profiles[0].failures, 0);
}

#[tokio::test]
async fn when_every_profile_is_set_aside_one_is_still_tried_and_a_success_keeps_it() {
    set_env("KT_CRED_TEST_ALL_A", "all-a");
    set_env("KT_CRED_TEST_ALL_B", "all-b");
    let b = broker(
        r#"
        [credentials.api]
        fail_after = 1
        fail_exit_codes = [1]
        profiles = [{ env = "KT_CRED_TEST_ALL_A" }, { env = "KT_CRED_TEST_ALL_B" }]
        "#,
    );
    b.report("api", "profile1", Some(1), b"");
    b.report("api", "profile2", Some(1), b"");
    // Both set aside: the one set aside longest ago is tried again.
    assert_eq!(value(&b, "api").await.0, "profile1");
    b.report("api", "profile1", Some(1), b"");
    assert_eq!(value(&b, "api").await.0, "profile2");
    b.report("api", "profile2", Some(0), b"");
    assert_eq!(value(&b, "api").await.0, "profile2");
    assert!(!b.status()[0].profiles[1].set_aside);
}

#[tokio::test]
async fn an_unreadable_profile_is_skipped_until_it_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-yet");
    set_env("KT_CRED_TEST_SKIP_B", "fallback");
    let b = broker(&format!(
        r#"
        [credentials.db]
        profiles = [
          {{ name = "file", file = "{}" }},
          {{ name = "env", env = "KT_CRED_TEST_SKIP_B" }},
          {{ name = "unset", env = "KT_CRED_TEST_SKIP_UNSET_NEVER" }},
        ]
        "#,
        missing.display()
    ));
    assert_eq!(value(&b, "db").await, ("env".into(), b"fallback".to_vec()));
    let st = &b.status()[0];
    assert_eq!(st.active, "env");
    let unreadable: Vec<bool> = st.profiles.iter().map(|p| p.unreadable).collect();
    assert_eq!(unreadable, [true, false, true]);

    std::fs::write(&missing, b"from-file").unwrap();
    b.reload().await;
    assert_eq!(
        value(&b, "db").await,
        ("file".into(), b"from-file".to_vec())
    );
    assert!(!b.status()[0].profiles[0].unreadable);
}

#[tokio::test]
async fn status_and_debug_name_profiles_never_values() {
    set_env("KT_CRED_TEST_STATUS", "hunter2-very-secret");
    let b = broker(
        r#"
        [credentials.gh]
        env = "KT_CRED_TEST_STATUS"
        [credentials.cmd]
        profiles = [{ name = "vault", command = ["sh", "-c", "echo other-very-secret"] }]
        "#,
    );
    let json = serde_json::to_string(&b.status()).unwrap();
    assert!(
        json.contains("\"gh\"") && json.contains("\"vault\""),
        "{json}"
    );
    for shown in [
        json,
        format!("{b:?}"),
        format!("{:?}", b.fetch("gh").await.unwrap()),
    ] {
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("other-very-secret"), "{shown}");
    }
}

#[tokio::test]
async fn a_rotated_value_brings_its_set_aside_profile_back() {
    set_env("KT_CRED_TEST_ROT_A", "old-a");
    set_env("KT_CRED_TEST_ROT_B", "b");
    let b = broker(
        r#"
        [credentials.api]
        fail_after = 1
        fail_exit_codes = [1]
        profiles = [{ env = "KT_CRED_TEST_ROT_A" }, { env = "KT_CRED_TEST_ROT_B" }]
        "#,
    );
    b.report("api", "profile1", Some(1), b"");
    assert_eq!(value(&b, "api").await.0, "profile2");
    // Reload without a change keeps the failure state...
    b.reload().await;
    assert_eq!(value(&b, "api").await.0, "profile2");
    // ...a new value gets a fresh start.
    set_env("KT_CRED_TEST_ROT_A", "new-a");
    b.reload().await;
    assert_eq!(
        value(&b, "api").await,
        ("profile1".into(), b"new-a".to_vec())
    );
}

#[tokio::test]
async fn a_file_removed_then_rewritten_with_a_new_value_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "old-token").unwrap();
    set_env("KT_CRED_TEST_RM_B", "backup-token");
    let b = broker(&format!(
        r#"
        [credentials.api]
        fail_after = 1
        fail_exit_codes = [1]
        profiles = [{{ file = "{}" }}, {{ env = "KT_CRED_TEST_RM_B" }}]
        "#,
        path.display()
    ));
    b.report("api", "profile1", Some(1), b"");
    assert_eq!(value(&b, "api").await.0, "profile2");
    std::fs::remove_file(&path).unwrap();
    b.reload().await;
    let st = &b.status()[0];
    assert!(st.profiles[0].unreadable && st.profiles[0].set_aside);
    // Still masked: a run started before may print it.
    assert!(b.values().contains(&b"old-token".to_vec()));
    std::fs::write(&path, "new-token").unwrap();
    b.reload().await;
    assert_eq!(
        value(&b, "api").await,
        ("profile1".into(), b"new-token".to_vec())
    );
}
