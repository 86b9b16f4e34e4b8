"""Names of the classifier's inputs, shared by the model, finetuning, inference and data/.
Imports nothing, so data/ need not import models/."""

AUDIO_VISUAL, AUDIO_ONLY, VISUAL_ONLY = "audio-visual", "audio-only", "visual-only"
# The classifier's three branches by index, in the order the finetuning step draws them;
# predictions name the one they used.
BRANCHES = (AUDIO_VISUAL, AUDIO_ONLY, VISUAL_ONLY)
