"""Dataset preparation (`dbnb prep SRC OUT`, the dataset notebook).

    from dbnb.prep import prepare_dataset
    report = prepare_dataset(config)                       # dataset_source -> instance_data_dir
    report = prepare_dataset(src="pics.zip", out="prepared", remove_background=False)

Modules: images (decode / normalise / hashes), segment (anime-segmentation ONNX),
framing (squares, faces, bust-up / cowboy crops), tagger (WD14 ONNX), tags (tags as caption
text, core tags), views (the guide's advice on each picture and the framing balance), captions,
report, pipeline (the run).
The notebook's upload box and caption editor are in dbnb.faces.widgets.
"""
from dbnb.data.intake import FetchError, fetch_images
from dbnb.data.pictures import BadImage, load_image
from dbnb.prep.captions import caption
from dbnb.prep.framing import (animeface_detector, framing_crops, framing_of, framing_regions, main_face, make_square,
                               pad_square)
from dbnb.prep.pipeline import PrepError, gather, prepare_dataset
from dbnb.prep.report import FileResult, PrepReport, contact_sheet
from dbnb.prep.segment import Segmenter, SegmenterError, composite, load_segmenter, write_stand_in_model
from dbnb.prep.tagger import Tagger, TaggerError, load_tagger, write_stand_in_tagger

__all__ = ["BadImage", "FetchError", "FileResult", "PrepError", "PrepReport", "Segmenter", "SegmenterError",
           "Tagger", "TaggerError", "animeface_detector", "caption", "composite", "contact_sheet", "fetch_images",
           "framing_crops", "framing_of", "framing_regions", "gather", "load_image", "load_segmenter", "load_tagger",
           "main_face", "make_square", "pad_square", "prepare_dataset", "write_stand_in_model",
           "write_stand_in_tagger"]
