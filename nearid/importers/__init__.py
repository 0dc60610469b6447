"""Importers from the public Hugging Face layouts (NearID, its distractor sources, MTG) into our tables.

The public datasets are wide (one row per identity, `images1..3`); our tables are long (one row per
view). Layouts read (local or `s3://`, see `layouts` and docs/import.md): hub Parquet shards,
`save_to_disk` folders (DatasetDict or Dataset; Arrow IPC stream shards), single `.parquet` /
`.arrow` files. Every shard is checked before anything is written (schema, row count, truncation,
split files, row alignment); rows are then read one record batch at a time and written in atomic
chunks, so a 300K-row source never sits in memory at once.

Rules the importers follow (the tests check them):
- ids: positives are `nearid-` + the release's `id` (zero-padded) when that column is present,
  non-null and unique, else `nearid-` + the row position; distractor row p takes the id of
  positives row p; MTG ids carry the split (`mtg-test-000012`); a root never mixes id schemes;
- image bytes are kept as they are (only checked to decode); masks become binary PNG "L" (0/255);
- a null image cell means "no such view" and is not counted as input; a view whose image or mask
  does not decode (or whose image has no mask) goes to `rejects` (stage "import") and the rest of
  the source is imported; counts satisfy `input == written + rejected + skipped`;
- `split`: the split files decide; positions in none of them take the source's `split` column
  when it exists and is not null, else "train";
- a rerun skips (id, view) keys already in the table and keys already rejected (`skipped`), so an
  interrupted import is finished without duplicates; delete the table to re-import differently.
"""
from .arrow_stream import StreamError, scan_stream
from .cli import main
from .common import ID_DIGITS, N_VIEWS, SPLIT_NAMES, make_id, read_split_file, split_files_in
from .layouts import LAYOUTS_TRIED, Source, SourceError, open_source
from .tables import (DISTRACTOR_COLUMNS, MTG_COLUMNS, POSITIVE_COLUMNS, import_distractors,
                     import_mtg, import_positives, mask_area)

__all__ = ["DISTRACTOR_COLUMNS", "ID_DIGITS", "LAYOUTS_TRIED", "MTG_COLUMNS", "N_VIEWS",
           "POSITIVE_COLUMNS", "SPLIT_NAMES", "Source", "SourceError", "StreamError",
           "import_distractors", "import_mtg", "import_positives", "main", "make_id", "mask_area",
           "open_source", "read_split_file", "scan_stream", "split_files_in"]
