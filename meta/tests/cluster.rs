//! The typed cluster layer: node liveness, placement epochs by compare-and-swap,
//! tenant keys. Against the embedded store, and the epoch race once against etcd.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Backend, eventually};
use trireme_meta::cluster::{
    Cluster, ClusterError, NodeRecord, ReplicaRecord, ReplicaState, TenantKeyRecord,
    VolumePlacement,
};

fn node(name: &str, dc: &str, port: u16) -> NodeRecord {
    NodeRecord {
        name: name.to_owned(),
        datacenter: dc.to_owned(),
        nbd_addr: format!("127.0.0.1:{port}").parse().expect("address"),
        peer_addr: format!("127.0.0.1:{}", port + 1).parse().expect("address"),
        admin_addr: format!("127.0.0.1:{}", port + 2).parse().expect("address"),
    }
}

fn placement(volume: &str) -> VolumePlacement {
    VolumePlacement {
        volume: volume.to_owned(),
        epoch: 0,
        replicas: ["n1", "n2", "n3"]
            .iter()
            .map(|n| ReplicaRecord {
                node: (*n).to_owned(),
                state: ReplicaState::InSync,
            })
            .collect(),
        attached_by: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_live_while_their_lease_is() {
    let backend = Backend::embedded().await;
    let cluster = Cluster::new(Arc::clone(&backend.store));
    let short = cluster
        .register_node(&node("n1", "dc1", 7000), Duration::from_secs(1))
        .await
        .expect("register n1");
    let long = cluster
        .register_node(&node("n2", "dc2", 7100), Duration::from_secs(60))
        .await
        .expect("register n2");
    let third = cluster
        .register_node(&node("n3", "dc3", 7200), Duration::from_secs(60))
        .await
        .expect("register n3");
    let names = |nodes: Vec<NodeRecord>| nodes.into_iter().map(|n| n.name).collect::<Vec<_>>();
    assert_eq!(
        names(cluster.live_nodes().await.expect("live")),
        ["n1", "n2", "n3"]
    );
    assert_eq!(
        cluster.live_nodes().await.expect("live")[1],
        node("n2", "dc2", 7100)
    );
    // n1 stops renewing: it drops out. n2 renews.
    cluster.renew_node(&long).await.expect("renew");
    let dropped = eventually(Duration::from_secs(10), || async {
        names(cluster.live_nodes().await.expect("live")) == ["n2", "n3"]
    })
    .await;
    assert!(dropped, "a node whose lease expired must not be live");
    assert!(matches!(
        cluster.renew_node(&short).await,
        Err(ClusterError::RenewNode { .. })
    ));
    // Clean shutdown withdraws at once.
    cluster.deregister_node(&third).await.expect("deregister");
    assert_eq!(names(cluster.live_nodes().await.expect("live")), ["n2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_change_only_from_the_expected_epoch() {
    let backend = Backend::embedded().await;
    let cluster = Cluster::new(Arc::clone(&backend.store));
    cluster
        .create_placement(&placement("vol1"))
        .await
        .expect("create");
    assert!(matches!(
        cluster.create_placement(&placement("vol1")).await,
        Err(ClusterError::PlacementExists { .. })
    ));
    let attached = cluster
        .bump_epoch("vol1", 0, |p| p.attached_by = Some("n1".to_owned()))
        .await
        .expect("attach");
    assert_eq!(attached.epoch, 1);
    assert_eq!(attached.attached_by.as_deref(), Some("n1"));
    let (stored, _) = cluster
        .placement("vol1")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(stored, attached);
    // A writer still believing in epoch 0 is refused and told the winner.
    match cluster
        .bump_epoch("vol1", 0, |p| p.attached_by = Some("n2".to_owned()))
        .await
    {
        Err(ClusterError::EpochConflict {
            expected, current, ..
        }) => {
            assert_eq!(expected, 0);
            assert_eq!(current.epoch, 1);
            assert_eq!(current.attached_by.as_deref(), Some("n1"));
        }
        other => panic!("expected an epoch conflict, got {other:?}"),
    }
    // Marking a replica out of sync is an epoch change too.
    let marked = cluster
        .bump_epoch("vol1", 1, |p| {
            if let Some(r) = p.replicas.iter_mut().find(|r| r.node == "n3") {
                r.state = ReplicaState::OutOfSync;
            }
            p.epoch = 999; // ignored: the epoch is bump_epoch's alone
        })
        .await
        .expect("mark out of sync");
    assert_eq!(marked.epoch, 2);
    assert_eq!(marked.replicas[2].state, ReplicaState::OutOfSync);
    assert!(matches!(
        cluster.bump_epoch("nope", 0, |_| {}).await,
        Err(ClusterError::NoPlacement { .. })
    ));
}

async fn race_for_epoch(cluster: &Cluster) {
    const RACERS: usize = 8;
    cluster
        .create_placement(&placement("raced"))
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            let me = format!("n{i}");
            cluster
                .bump_epoch("raced", 0, |p| p.attached_by = Some(me.clone()))
                .await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            Ok(p) => winners.push(p),
            Err(ClusterError::EpochConflict { current, .. }) => assert_eq!(current.epoch, 1),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one attach wins epoch 1");
    let (stored, _) = cluster
        .placement("raced")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(stored, winners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_when_attaches_race_embedded() {
    let backend = Backend::embedded().await;
    race_for_epoch(&Cluster::new(Arc::clone(&backend.store))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_when_attaches_race_etcd() {
    let backend = Backend::etcd().await;
    let cluster = Cluster::new(Arc::clone(&backend.store));
    race_for_epoch(&cluster).await;
    let registration = cluster
        .register_node(&node("e1", "dc1", 7300), Duration::from_secs(5))
        .await
        .expect("register");
    assert_eq!(
        cluster.live_nodes().await.expect("live"),
        [node("e1", "dc1", 7300)]
    );
    cluster
        .deregister_node(&registration)
        .await
        .expect("deregister");
    assert!(cluster.live_nodes().await.expect("live").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_keys_are_created_once_and_shredded() {
    let backend = Backend::embedded().await;
    let cluster = Cluster::new(Arc::clone(&backend.store));
    let record = TenantKeyRecord {
        tenant: "acme".to_owned(),
        wrapped_key: "00ff".repeat(12),
    };
    cluster.create_tenant_key(&record).await.expect("create");
    assert!(matches!(
        cluster
            .create_tenant_key(&TenantKeyRecord {
                wrapped_key: "11".to_owned(),
                ..record.clone()
            })
            .await,
        Err(ClusterError::TenantKeyExists { .. })
    ));
    assert_eq!(
        cluster.tenant_key("acme").await.expect("read"),
        Some(record)
    );
    assert!(cluster.delete_tenant_key("acme").await.expect("delete"));
    assert_eq!(cluster.tenant_key("acme").await.expect("read"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_errors_not_panics() {
    let backend = Backend::embedded().await;
    let cluster = Cluster::new(Arc::clone(&backend.store));
    backend
        .store
        .put("placement/bad", b"{not json")
        .await
        .expect("put");
    assert!(matches!(
        cluster.placement("bad").await,
        Err(ClusterError::DecodeRecord { .. })
    ));
    assert!(matches!(
        cluster.bump_epoch("bad", 0, |_| {}).await,
        Err(ClusterError::DecodeRecord { .. })
    ));
}
