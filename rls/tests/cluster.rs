//! The same binary against a local 3-node Redis Cluster.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn limits_hold_on_a_redis_cluster() {
    let nodes: Vec<Redis> = (0..3)
        .map(|_| {
            let port = free_port();
            let conf = format!("nodes-{port}.conf");
            Redis::start_with(port, &["--cluster-enabled", "yes", "--cluster-config-file", &conf])
        })
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let t = Instant::now();
    while !nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
        assert!(t.elapsed() < Duration::from_secs(10), "cluster not ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rls = Rls::start(&["--redis-cluster", &addrs.join(",")]);
    let mut c = rls.client().await;
    // 5 per minute for each of 12 values: their keys spread over the nodes' slots.
    let values: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    for v in &values {
        for i in 0..7 {
            let r = c.call(vec![descriptor(&[("m", v)]), descriptor(&[("tok", v)])], 1).await.unwrap();
            let want = if i < 5 { Code::Ok } else { Code::OverLimit };
            assert_eq!(r.statuses[0].code, want as i32, "{v} call {i}");
            assert_eq!(r.statuses[1].code, Code::Ok as i32);
        }
    }
    let holding = nodes.iter().filter(|n| n.cli(&["DBSIZE"]).trim() != "0").count();
    assert!(holding >= 2, "keys on {holding} node(s) only");
    // Script flushed on every node: NOSCRIPT, loaded again.
    for n in &nodes {
        n.cli(&["SCRIPT", "FLUSH"]);
    }
    assert!(c.hit(&[("m", "fresh")]).await);
    assert_eq!(rls.get("/healthz").0, 200);
}
