"""Library-native exports of the distilled student: each loads in its own library, kdkit not imported.

A run's ``export/`` folder (``task.export``; ``export/gen<k>/`` for born-again generations).
Every setting keeps the bare state dicts ``student.pt`` / ``student.safetensors`` (load into the
kdkit class); retrieval writes a sentence-transformers folder instead. Beside them:

Vision classification (``ClassificationTask``; ``program.py``, ``timm_dir.py``)::

    export/student.pt2     torch.export program: normalisation + student -> logits, dynamic batch
    export/student.onnx    the same program as ONNX (written when onnx + onnxscript are installed)
    export/inputs.json     what the programs take: channels, image_size, mean/std (applied inside:
                           feed images in [0, 1]), resize, num_classes, class_names
    export/timm/           timm students only: timm's hub folder (config.json + model.safetensors)

    model = torch.export.load("export/student.pt2").module()
    logits = model(images)                    # float32 [B, C, H, W] in [0, 1]

    session = onnxruntime.InferenceSession("export/student.onnx")
    logits = session.run(None, {"input": images.numpy()})[0]

    model = timm.create_model("local-dir:export/timm", pretrained=True)  # timm's own loader
    cfg = timm.data.resolve_data_config(model=model)     # input size, mean, std kdkit used

CLIP image-text (``ImageTextTask``; ``open_clip_dir.py``)::

    export/open_clip/      open_clip_config.json (model_cfg + preprocess_cfg) + open_clip_model.safetensors

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:export/open_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:export/open_clip")

Dense retrieval (``RetrievalTask``; ``sentence_transformers_dir.py``)::

    export/                SentenceTransformer.save: modules.json, config.json + model.safetensors
                           (transformer), tokenizer, 1_Pooling/, [2_Dense/], [N_Normalize/]
    export/exit<k>/        the same for the student cut after block k (task.export_exits:
                           multi-exit students, ``kdkit.tasks.retrieval_exits``)

    model = sentence_transformers.SentenceTransformer("export")
    embeddings = model.encode(["a query"])    # = kdkit's TextEncoder.encode

    backbone = transformers.AutoModel.from_pretrained("export", add_pooling_layer=False)  # BERT-like:
                                              # token states, without the pooler kdkit dropped

Node classification, graph-free students (``NodeTask``; ``program.py``)::

    export/student.pt2, export/student.onnx   node features [N, F] -> logits [N, classes], dynamic N
    export/inputs.json     num_features, num_classes, the feature normalisation the data applied
                           (row sums for GraphDataModule(normalize_features=true): apply it yourself)

    model = torch.export.load("export/student.pt2").module()
    logits = model(features)                  # float32 [N, F], preprocessed as inputs.json says

An optional format that cannot be written (a model torch.export cannot trace, onnx missing) costs
one warning line (``kdkit.exports.optional.optional_format``); the other formats are still written.
"""
