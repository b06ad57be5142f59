//! The subcommands other than `serve`, each a client or a tool beside the service:
//! `tally sum` ([`sum`], the CSV engine on a file), `tally load` ([`load`], the
//! pipeline's client and a load generator) and `tally upstream` ([`upstream`], the slow
//! demo upstream a source can poll). They take their arguments from [`crate::config`];
//! the rooms below them (`csv`, `series`, ...) know nothing of the command line.

pub mod load;
pub mod sum;
pub mod upstream;
