//! The reusable readers and writers a tool embedding zeroconv needs without its command line or training loop:
//! configs (`config/`: NeMo YAML, overrides, the typed schema, the validator, the models' hyper-parameters),
//! checkpoints (`checkpoint/`: containers and key layouts, the diffusers export), WebDataset shards and the data
//! loader (`data/`, with the synthetic dataset), the CLIP tokenizer (`tokenizer/`), and the rule that no output
//! overwrites an input (`outputs`). Nothing here parses a command line.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod outputs;
pub mod tokenizer;
