"""The tiny world's bilingual dictionary: English words with French, Spanish and German translations.

One entry per line, grouped by category (`# food`); `*` marks the core vocabulary: common
words that the corpus mentions far more often (as real text does) and that the translation
tasks use, so a small base model can learn them in minutes. Every translation is a single
word so that translation answers are exact. Simplified on purpose: one sense per word, no plurals or
genders, and words whose translation equals the English spelling are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

LANGUAGES = ("English", "French", "Spanish", "German")

_TEXT = """
# food
cheese fromage queso Käse *
bread pain pan Brot *
apple pomme manzana Apfel *
milk lait leche Milch *
water eau agua Wasser *
wine vin vino Wein *
beer bière cerveza Bier
meat viande carne Fleisch
fish poisson pescado Fisch *
rice riz arroz Reis
salt sel sal Salz
sugar sucre azúcar Zucker
soup soupe sopa Suppe
cake gâteau pastel Kuchen
honey miel miel Honig
coffee café café Kaffee
tea thé té Tee
juice jus zumo Saft
pear poire pera Birne
lemon citron limón Zitrone
grape raisin uva Traube
strawberry fraise fresa Erdbeere
cherry cerise cereza Kirsche
carrot carotte zanahoria Karotte
onion oignon cebolla Zwiebel
garlic ail ajo Knoblauch
mushroom champignon champiñón Pilz
nut noix nuez Nuss
oil huile aceite Öl
pepper poivre pimienta Pfeffer
# animals
dog chien perro Hund *
cat chat gato Katze *
horse cheval caballo Pferd *
cow vache vaca Kuh *
pig cochon cerdo Schwein
sheep mouton oveja Schaf
goat chèvre cabra Ziege
bird oiseau pájaro Vogel *
mouse souris ratón Maus *
rabbit lapin conejo Kaninchen
bear ours oso Bär *
fox renard zorro Fuchs
duck canard pato Ente
frog grenouille rana Frosch
snake serpent serpiente Schlange
bee abeille abeja Biene
spider araignée araña Spinne
butterfly papillon mariposa Schmetterling
monkey singe mono Affe
elephant éléphant elefante Elefant
whale baleine ballena Wal
owl hibou búho Eule
ant fourmi hormiga Ameise
snail escargot caracol Schnecke
turtle tortue tortuga Schildkröte
deer cerf ciervo Hirsch
donkey âne burro Esel
goose oie ganso Gans
chicken poulet pollo Huhn
# nature
tree arbre árbol Baum *
flower fleur flor Blume *
sun soleil sol Sonne *
moon lune luna Mond *
star étoile estrella Stern
sky ciel cielo Himmel
rain pluie lluvia Regen
snow neige nieve Schnee
cloud nuage nube Wolke
sea mer mar Meer *
river rivière río Fluss *
lake lac lago See
mountain montagne montaña Berg *
forest forêt bosque Wald
island île isla Insel
stone pierre piedra Stein
sand sable arena Sand
fire feu fuego Feuer
ice glace hielo Eis
earth terre tierra Erde
grass herbe hierba Gras
leaf feuille hoja Blatt
beach plage playa Strand
field champ campo Feld
storm tempête tormenta Sturm
# time
night nuit noche Nacht *
day jour día Tag *
morning matin mañana Morgen *
evening soir tarde Abend
summer été verano Sommer *
spring printemps primavera Frühling
autumn automne otoño Herbst
year année año Jahr *
week semaine semana Woche *
hour heure hora Stunde
# home
house maison casa Haus *
door porte puerta Tür *
window fenêtre ventana Fenster *
chair chaise silla Stuhl *
bed lit cama Bett *
kitchen cuisine cocina Küche
key clé llave Schlüssel *
spoon cuillère cuchara Löffel
knife couteau cuchillo Messer
fork fourchette tenedor Gabel
cup tasse taza Tasse
plate assiette plato Teller
glass verre vaso Glas
bottle bouteille botella Flasche
box boîte caja Kiste
lamp lampe lámpara Lampe
mirror miroir espejo Spiegel
clock horloge reloj Uhr
wall mur pared Wand
roof toit techo Dach
garden jardin jardín Garten
bag sac bolsa Tasche
book livre libro Buch *
pen stylo bolígrafo Stift
paper papier papel Papier
letter lettre carta Brief
candle bougie vela Kerze
blanket couverture manta Decke
soap savon jabón Seife
towel serviette toalla Handtuch
pillow oreiller almohada Kissen
bucket seau cubo Eimer
rope corde cuerda Seil
ladder échelle escalera Leiter
nail clou clavo Nagel
needle aiguille aguja Nadel
basket panier cesta Korb
umbrella parapluie paraguas Regenschirm
coin pièce moneda Münze
money argent dinero Geld
# clothes
shoe chaussure zapato Schuh *
hat chapeau sombrero Hut *
shirt chemise camisa Hemd *
dress robe vestido Kleid *
coat manteau abrigo Mantel *
glove gant guante Handschuh
sock chaussette calcetín Socke
scarf écharpe bufanda Schal
# body
hand main mano Hand *
foot pied pie Fuß *
head tête cabeza Kopf *
nose nez nariz Nase *
mouth bouche boca Mund *
ear oreille oreja Ohr
arm bras brazo Arm
leg jambe pierna Bein
tooth dent diente Zahn
hair cheveux pelo Haar *
finger doigt dedo Finger
knee genou rodilla Knie
back dos espalda Rücken
blood sang sangre Blut
bone os hueso Knochen
skin peau piel Haut
tongue langue lengua Zunge
neck cou cuello Hals
# people
mother mère madre Mutter *
father père padre Vater *
brother frère hermano Bruder *
child enfant niño Kind *
friend ami amigo Freund *
king roi rey König *
queen reine reina Königin
woman femme mujer Frau
man homme hombre Mann
boy garçon chico Junge
girl fille chica Mädchen
teacher professeur profesor Lehrer
doctor médecin médico Arzt
farmer fermier granjero Bauer
baker boulanger panadero Bäcker
cook cuisinier cocinero Koch
neighbor voisin vecino Nachbar
soldier soldat soldado Soldat
sailor marin marinero Seemann
thief voleur ladrón Dieb
# places
city ville ciudad Stadt *
street rue calle Straße *
bridge pont puente Brücke *
church église iglesia Kirche
school école escuela Schule *
market marché mercado Markt *
shop magasin tienda Laden
library bibliothèque biblioteca Bibliothek
castle château castillo Burg
tower tour torre Turm
farm ferme granja Bauernhof
boat bateau barco Boot *
ship navire buque Schiff
car voiture coche Auto
bicycle vélo bicicleta Fahrrad
wheel roue rueda Rad
station gare estación Bahnhof
airport aéroport aeropuerto Flughafen
# things
gift cadeau regalo Geschenk *
game jeu juego Spiel *
song chanson canción Lied *
ball balle pelota Ball *
doll poupée muñeca Puppe
map carte mapa Karte *
dream rêve sueño Traum
voice voix voz Stimme
war guerre guerra Krieg
peace paix paz Frieden
love amour amor Liebe *
fear peur miedo Angst
luck chance suerte Glück
iron fer hierro Eisen
wood bois madera Holz
# colors
red rouge rojo rot *
blue bleu azul blau *
green vert verde grün *
yellow jaune amarillo gelb *
black noir negro schwarz *
white blanc blanco weiß *
grey gris gris grau
brown brun marrón braun
pink rose rosa rosa
purple violet morado lila
# adjectives
big grand grande groß *
small petit pequeño klein *
hot chaud caliente heiß *
cold froid frío kalt *
old vieux viejo alt *
new nouveau nuevo neu *
good bon bueno gut *
bad mauvais malo schlecht
happy heureux feliz glücklich
sad triste triste traurig
fast rapide rápido schnell
slow lent lento langsam
short court corto kurz
strong fort fuerte stark
weak faible débil schwach
rich riche rico reich
young jeune joven jung
clean propre limpio sauber
dirty sale sucio schmutzig
heavy lourd pesado schwer
empty vide vacío leer
full plein lleno voll
dark sombre oscuro dunkel
easy facile fácil leicht
sweet sucré dulce süß
quiet calme tranquilo ruhig
loud bruyant ruidoso laut
tired fatigué cansado müde
hungry affamé hambriento hungrig
brave courageux valiente mutig
beautiful beau hermoso schön
# numbers
one un uno eins *
two deux dos zwei *
three trois tres drei *
four quatre cuatro vier *
five cinq cinco fünf *
seven sept siete sieben
eight huit ocho acht
nine neuf nueve neun
ten dix diez zehn *
hundred cent cien hundert
thousand mille mil tausend
# verbs
eat manger comer essen *
drink boire beber trinken *
sleep dormir dormir schlafen *
run courir correr laufen *
walk marcher caminar gehen
swim nager nadar schwimmen
sing chanter cantar singen *
dance danser bailar tanzen
read lire leer lesen *
write écrire escribir schreiben
speak parler hablar sprechen
listen écouter escuchar hören
see voir ver sehen
buy acheter comprar kaufen
sell vendre vender verkaufen
open ouvrir abrir öffnen
close fermer cerrar schließen
play jouer jugar spielen
work travailler trabajar arbeiten
learn apprendre aprender lernen
think penser pensar denken
give donner dar geben
take prendre tomar nehmen
find trouver encontrar finden
wait attendre esperar warten
fly voler volar fliegen
cry pleurer llorar weinen
laugh rire reír lachen
jump sauter saltar springen
climb grimper trepar klettern
build construire construir bauen
paint peindre pintar malen
wash laver lavar waschen
help aider ayudar helfen
"""


@dataclass(frozen=True)
class Entry:
    """One dictionary entry: the word in each language and its category."""

    category: str
    english: str
    french: str
    spanish: str
    german: str
    core: bool = False  # a common word: frequent in the corpus, used by the translation tasks

    def word(self, language: str) -> str:
        return getattr(self, language.lower())


def _parse(text: str) -> tuple[Entry, ...]:
    entries, category = [], ""
    for line in text.strip().splitlines():
        if line.startswith("#"):
            category = line[1:].strip()
            continue
        en, fr, es, de, *mark = line.split()
        entries.append(Entry(category, en, fr, es, de, core=mark == ["*"]))
    return tuple(entries)


DICTIONARY: tuple[Entry, ...] = _parse(_TEXT)
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(e.category for e in DICTIONARY))
BY_ENGLISH: dict[str, Entry] = {e.english: e for e in DICTIONARY}
CORE: tuple[Entry, ...] = tuple(e for e in DICTIONARY if e.core)
