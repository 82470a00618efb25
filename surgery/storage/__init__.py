"""What is written and read, safely: checkpoints that rebuild without pickled code
(:mod:`.checkpoint`), what a checkpoint is read without building it (:mod:`.info`), atomic writes
(:mod:`.atomic`), outputs that never destroy data and their locks (:mod:`.safety`), and the trust
boundary: what a checkpoint or a recipe may make this process run (:mod:`.trust`)."""
