"""Mock observations of every modality, deterministic given (seed, index).

`generators` is the registry (`generate(card, n)`); one module per modality: `spectra`
(13 classes with an instrument model), `images` (GalSim stamps and blends), `cubes`
(HI cube chunks), `fields` (21cm lightcone chunks from `sim21cm`, our excursion-set
simulator). `luminosity` holds the luminosity functions that place the objects of
spectra and images in redshift and magnitude. Importing this package imports none of them.
"""
