//! `weir cluster status`: a partitioned pipeline's partitions as the server knows them, for
//! operators: the hosts running it (its members), who holds each partition's lease and how
//! fresh it is, which host the spread wants for it, what its last progress marker says, and
//! its consumer's backlog. Reads only.

use weir_core::fence::Progress;
use weir_core::ports::Ledger;
use weir_nats::Broker;

use super::PipelineArgs;

pub async fn status(target: PipelineArgs) -> Result<(), crate::Error> {
    let pipeline = target.load()?;
    let Some(partitions) = pipeline.partitions else {
        return Err(crate::Error::Usage(format!(
            "pipeline {:?} is not partitioned: it has no `partitions`",
            pipeline.name
        )));
    };
    let failed = |error: weir_nats::BrokerError| crate::Error::Engine(error.to_string());
    let broker = Broker::connect(&pipeline.nats, &format!("weir-cluster-{}", pipeline.name))
        .await
        .map_err(failed)?;
    let ledger = broker
        .existing_ledger(&pipeline.output, &pipeline.marker_subjects())
        .await
        .map_err(failed)?;
    let replicas = broker
        .stream_replicas(&pipeline.input.stream)
        .await
        .map_err(failed)?;
    let leases = broker.leases(replicas).await.map_err(failed)?;
    println!(
        "pipeline {:?}: {partitions} partition(s), lease TTL {} s, commits on stream {}",
        pipeline.name,
        pipeline.lease_ttl_secs,
        ledger.as_deref().unwrap_or("(none yet)")
    );
    let members = leases.members(&pipeline.name).await.map_err(failed)?;
    match members.is_empty() {
        true => println!("members: none (no host is running it)"),
        false => println!("members: {}", members.join(", ")),
    }
    let by_name: Vec<&str> = members.iter().map(String::as_str).collect();
    let wanted = weir_core::spread::assign(partitions, &by_name);
    println!(
        "{:<9}  {:<40}  {:>9}  {:<40}  {:>10}  {:>8}  {:>10}  {:>10}  {:>8}  {:>11}",
        "PARTITION",
        "LEASE HELD BY",
        "LEASE AGE",
        "WANTED ON",
        "MARKER SEQ",
        "COMMITS",
        "FLOOR",
        "DONE ABOVE",
        "PENDING",
        "ACK PENDING"
    );
    for partition in pipeline.partition_indexes() {
        let consumer = broker
            .consumer_state(&pipeline.partition_input(partition))
            .await
            .ok();
        let lease = leases
            .view(&pipeline.lease_key(partition))
            .await
            .map_err(failed)?;
        let (holder, age) = match &lease {
            Some(view) => (
                view.holder.clone().unwrap_or_else(|| "(free)".into()),
                format!("{:.1} s", view.age.as_secs_f64()),
            ),
            None => ("(never taken)".into(), "-".into()),
        };
        let marker = match &ledger {
            Some(stream) => broker
                .ledger(stream)
                .last_marker(&pipeline.marker_subject(partition))
                .await
                .map_err(|e| crate::Error::Engine(e.to_string()))?,
            None => None,
        };
        let (sequence, commits, floor, done_above) = match marker {
            Some(marker) => {
                let progress = Progress::parse(marker.sequence, &marker.payload)
                    .map_err(|e| crate::Error::Engine(e.to_string()))?;
                (
                    marker.sequence.to_string(),
                    progress.commit.to_string(),
                    progress.floor.to_string(),
                    progress.done_above.len().to_string(),
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let (pending, ack_pending) = match &consumer {
            Some(state) => (state.pending.to_string(), state.ack_pending.to_string()),
            None => ("-".into(), "-".into()),
        };
        let wanted = wanted[partition as usize].unwrap_or("-");
        println!(
            "{partition:<9}  {holder:<40}  {age:>9}  {wanted:<40}  {sequence:>10}  {commits:>8}  {floor:>10}  {done_above:>10}  {pending:>8}  {ack_pending:>11}"
        );
    }
    Ok(())
}
