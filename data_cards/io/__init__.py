"""Files in and out: our FITS layout (`fits_io`), Hugging Face datasets folders
(`hf_io`), catalogues (`catalogue`) and survey-file helpers (`survey_files`).

The survey formats that astronomers hand us (SDSS, DESI, ESO, tables, cubes, images)
are read by `cosmofm.data_cards.readers`, which builds on these.
"""
