//! What each subcommand does, once [`crate::cli`] has parsed the command line.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, Common, DlqAction};
use crate::error::{Error, Result};
use crate::event::{Event, EventType, Meta};
use crate::keys::Keys;

async fn connect(common: &Common) -> Result<crate::connection::Conn> {
    crate::connection::connect(&common.client()?, Duration::from_secs(5)).await
}

fn to_json(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::Protocol(e.to_string()))
}

fn render_status(st: &crate::ops::Status) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "stream {}  length {}  dead letters {}",
        st.stream, st.stream_length, st.dead_letters
    );
    let _ = writeln!(
        s,
        "live sessions {}  present users {}",
        st.live_sessions, st.present_users
    );
    let _ = writeln!(
        s,
        "\n{:<20} {:>10} {:>10} {:>14} {:>7}  last delivered",
        "group", "lag", "pending", "oldest pending", "leases"
    );
    for g in &st.groups {
        let lag = g.lag.map_or("?".to_owned(), |l| l.to_string());
        let age = g
            .oldest_pending_age_ms
            .map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let _ = writeln!(
            s,
            "{:<20} {lag:>10} {:>10} {age:>14} {:>7}  {}",
            g.name, g.pending, g.leases, g.last_delivered
        );
        for c in &g.consumers {
            let _ = writeln!(
                s,
                "  consumer {:<30} pending {:>8}  idle {:.1}s",
                c.name,
                c.pending,
                c.idle_ms as f64 / 1000.0
            );
        }
    }
    s
}

/// Runs the parsed command line.
pub async fn execute(cli: Cli) -> Result<()> {
    let common = &cli.common;
    match cli.command {
        Command::Run(args) => {
            let token = CancellationToken::new();
            crate::shutdown::cancel_on_signals(token.clone());
            crate::worker::run(args.config(common), token).await
        }
        Command::Publish(args) => {
            let kind = EventType::parse(&args.kind)
                .ok_or_else(|| Error::Config(format!("unknown event type {:?}", args.kind)))?;
            let mut ev = Event::new(kind, args.doc, args.user);
            ev.session = args.session;
            ev.seq = args.seq;
            if !args.meta.is_empty() {
                ev.meta = Some(args.meta.into_iter().collect::<Meta>());
            }
            // Refuse a bad event before connecting: the error is about the event, not Redis.
            ev.validate(&crate::limits::Limits::default())?;
            let mut producer = crate::produce::Producer::connect_with(
                &common.redis_url,
                &common.connect_options(),
                &common.stream,
            )
            .await?
            .with_shards(common.stream_shards);
            let id = producer.publish(&ev).await?;
            println!("{id} {}", ev.id);
            Ok(())
        }
        Command::Inspect { doc, json } => {
            let mut con = connect(common).await?;
            let state = crate::inspect::inspect(&mut con, &Keys::new(&common.prefix), &doc).await?;
            if json {
                let text = serde_json::to_string_pretty(&state)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                println!("{text}");
            } else {
                print!("{}", crate::demo::render(&doc, &state));
            }
            Ok(())
        }
        Command::Dlq {
            dead_letter_stream,
            action,
        } => {
            let mut con = connect(common).await?;
            match action {
                DlqAction::List { count, json } => {
                    let entries = crate::dlq::list(&mut con, &dead_letter_stream, count).await?;
                    if json {
                        let text = serde_json::to_string_pretty(&entries)
                            .map_err(|e| Error::Protocol(e.to_string()))?;
                        println!("{text}");
                    } else {
                        for e in &entries {
                            let what = e.event.clone().unwrap_or_else(|| format!("{:?}", e.fields));
                            println!(
                                "{}  entry {}  {}  error: {}",
                                e.id, e.entry_id, what, e.error
                            );
                        }
                        println!("{} dead letter(s)", entries.len());
                    }
                }
                DlqAction::Replay { ids } => {
                    let n = crate::dlq::replay(&mut con, &dead_letter_stream, &ids).await?;
                    println!("replayed {n} dead letter(s)");
                }
            }
            Ok(())
        }
        Command::Status {
            dead_letter_stream,
            json,
        } => {
            let mut con = connect(common).await?;
            let keys = Keys::new(&common.prefix).with_cluster(con.is_cluster());
            // One status per stream (per shard with --stream-shards).
            let mut all = Vec::new();
            for stream in crate::shard::streams(&common.stream, common.stream_shards) {
                all.push(crate::ops::status(&mut con, &keys, &stream, &dead_letter_stream).await?);
            }
            if json && common.stream_shards == 0 {
                println!("{}", to_json(&all[0])?);
            } else if json {
                println!("{}", to_json(&all)?);
            } else {
                for st in &all {
                    print!("{}", render_status(st));
                }
            }
            Ok(())
        }
        Command::Top { n } => {
            let mut con = connect(common).await?;
            let keys = Keys::new(&common.prefix).with_cluster(con.is_cluster());
            let rows = crate::ops::top(&mut con, &keys, n).await?;
            println!("{:>8}  document", "users");
            for (doc, users) in rows {
                println!("{users:>8}  {doc}");
            }
            Ok(())
        }
        Command::Repair {
            fix,
            history,
            session_ttl,
        } => {
            let mut con = connect(common).await?;
            let keys = Keys::new(&common.prefix).with_cluster(con.is_cluster());
            let (h, t) = (history.as_millis() as u64, session_ttl.as_millis() as u64);
            let report =
                crate::ops::repair(&mut con, &keys, h, t, fix, crate::ops::print_progress).await?;
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprintln!();
            }
            eprintln!("checked {} documents", report.documents);
            for (doc, problems) in &report.broken {
                for p in problems {
                    println!("{doc}: {p}");
                }
            }
            let verb = if fix {
                "fixed"
            } else {
                "inconsistent (dry run: --fix repairs them)"
            };
            println!(
                "{} of {} documents {verb}",
                report.broken.len(),
                report.documents
            );
            Ok(())
        }
        Command::Snapshots {
            snapshot_stream,
            follow,
        } => crate::follow::snapshots(common, &snapshot_stream, follow).await,
        Command::Watch { doc } => crate::follow::watch(common, &doc).await,
        Command::Bench(args) => crate::bench::run(common, args).await,
        Command::Demo(args) => crate::demo::run(common, args).await,
    }
}
